"""How deep and how wide the trees a run reached were, so depth coverage is measured.

A bug that needs a thousand-node chain (a recursive walk, a per-level cost, a counter that
overflows) is out of reach of runs whose trees stay shallow; every report therefore says the
deepest chain and the widest fan-out it reached. Both come from each lane's shadow model
(blocks, every implementation alike) and, where the implementation's radix tree can be
walked from Python, from the implementation itself (nodes: a radix node holds many blocks).
"""

from __future__ import annotations


def shadow_shape(shadow) -> dict:
    """``{"depth_blocks", "fanout"}`` of a :class:`~bcr_verify.models.ReferenceCache`."""
    depth = {}
    deepest = 0
    fanout = len(shadow._root_children)
    for block in shadow._by_value.values():  # parents are inserted before their children
        d = depth[id(block)] = 1 + (depth.get(id(block.parent), 0) if block.parent else 0)
        deepest = max(deepest, d)
        fanout = max(fanout, len(block.children))
    return {"depth_blocks": deepest, "fanout": fanout}


def node_depth(adapter) -> int | None:
    """The deepest chain of radix nodes in the implementation, where it can be walked."""
    cache = getattr(adapter, "cache", None)
    try:
        root = getattr(cache, "root_node", None)
    except NotImplementedError:  # a tree core in native code
        return None
    if root is None or not hasattr(root, "children"):
        return None
    deepest, stack = 0, [(root, 0)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((child, d + 1) for child in node.children.values())
    return deepest


def lockstep_shape(lockstep) -> dict:
    """Per lane: depth in blocks and nodes, and the widest fan-out."""
    out = {}
    for lane in lockstep.lanes:
        shape = shadow_shape(lane.shadow)
        shape["depth_nodes"] = node_depth(lane.adapter)
        out[lane.name] = shape
    return out


def widest(a: dict, b: dict) -> dict:
    """Per lane, the larger of each measure in ``a`` and ``b``."""
    merged = {k: dict(v) for k, v in a.items()}
    for lane, shape in b.items():
        mine = merged.setdefault(lane, {})
        for key, value in shape.items():
            if value is not None and (mine.get(key) is None or value > mine[key]):
                mine[key] = value
    return merged


def shape_line(shape: dict) -> str:
    """The deepest chain and widest fan-out reached, in one line."""
    if not shape:
        return "tree shape: not measured"
    parts = []
    for lane, s in shape.items():
        nodes = f", {s['depth_nodes']} nodes" if s.get("depth_nodes") is not None else ""
        parts.append(f"{lane} {s.get('depth_blocks', 0)} blocks{nodes} deep, fan-out "
                     f"{s.get('fanout', 0)}")
    return "deepest tree: " + "; ".join(parts)
