"""The events oracle: correct streams pass, and each broken stream is caught by the rule that
names it (a real SGLang cache whose published events are altered one way each); vLLM's
per-copy removal is what a plain router consumer gets wrong and a refcounting one survives."""

from __future__ import annotations

import pytest

from bcr_verify.adapters import CacheSpec, Cleared, Removed, Stored, resolve
from bcr_verify.errors import Divergence
from bcr_verify.event_index import ReferenceIndex, blocks_of
from bcr_verify.events import RULES
from bcr_verify.runner import RunConfig, run
from bcr_verify.session import build_lockstep

BS = 4
A = [1, 2, 3, 4, 5, 6, 7, 8]
B = [9, 10, 11, 12, 5, 6, 7, 8]     # A's second block under another parent
C = A + [13, 14, 15, 16]             # a store whose first block is not a root block


def scenario(ls):
    for tokens in (A, B, C):
        ls.finish(ls.begin(tokens))
    ls.match(A)
    ls.evict(BS)        # LRU caches evict a leaf
    ls.evict_value(0)   # lazy caches uncache one block
    ls.reset()


def lost_parent(events):
    return [Stored(e.hashes, None, e.tokens) if isinstance(e, Stored) else e for e in events]


def self_parent(events):
    return [Stored(e.hashes, e.hashes[0], e.tokens) if isinstance(e, Stored) else e
            for e in events]


RENAMED: dict = {}
"""content_only_hash's real hash -> content hash, kept across steps to rename parents."""


def content_only_hash(events):
    memo, out = RENAMED, []
    for e in events:
        if isinstance(e, Stored):
            new = tuple(hash(tuple(e.tokens[i * BS:(i + 1) * BS])) for i in range(len(e.hashes)))
            memo.update(zip(e.hashes, new))
            e = Stored(new, memo.get(e.parent, e.parent), e.tokens)
        elif isinstance(e, Removed):
            e = Removed(tuple(memo.get(h, h) for h in e.hashes))
        out.append(e)
    return out


def no_removals(events):
    return [e for e in events if not isinstance(e, Removed)]


def stores_twice(events):
    return [x for e in events for x in ((e, e) if isinstance(e, Stored) else (e,))]


def no_stores(events):
    return [e for e in events if not isinstance(e, Stored)]


def no_clears(events):
    return [e for e in events if not isinstance(e, Cleared)]


def phantom_removal(events):
    return events + [Removed((123456789,))] if any(isinstance(e, Stored) for e in events) \
        else events


BROKEN = {
    lost_parent: "lost parent link",
    self_parent: "self-parent",
    content_only_hash: "position-insensitive hash",
    no_removals: "missing removal",
    stores_twice: "duplicate store",
    no_stores: "missing store",
    no_clears: "flush not announced",
    phantom_removal: "removal of an unknown block",
}


def sglang_with(transform):
    adapter = resolve("sglang-radix").build(BS, 32, events=True)
    take = adapter.take_events
    adapter.take_events = lambda: transform(take())
    adapter.name = f"sglang-{transform.__name__.replace('_', '-')}"
    return adapter


def oracle_lockstep(adapter):
    from bcr_verify.events import EventsOracle
    from bcr_verify.lockstep import Lockstep
    return Lockstep([adapter], observers=[EventsOracle()])


@pytest.mark.parametrize("transform", BROKEN, ids=lambda t: t.__name__)
def test_each_broken_stream_is_caught_by_its_rule(transform):
    with pytest.raises(Divergence) as failure:
        scenario(oracle_lockstep(sglang_with(transform)))
    assert failure.value.check == f"events: {BROKEN[transform]}", failure.value
    assert BROKEN[transform] in RULES


@pytest.mark.parametrize("impl", ["sglang-radix", "sglang-unified-py", "sglang-unified-rust",
                                  "vllm-apc"])
def test_the_same_steps_pass_on_the_real_streams(impl):
    ls = oracle_lockstep(resolve(impl).build(BS, 32, events=True))
    scenario(ls)
    counts = ls.report()["events"]["lanes"][impl]
    assert counts["blocks_stored"] >= 5 and counts["blocks_removed"] >= 1, counts
    assert counts["index_checks"] and counts["dynamo_checks"], counts
    assert 0 < counts["dynamo_asked"] <= counts["dynamo_checks"] and counts["dynamo_seconds"] > 0


def vllm_two_copies():
    """A block-aligned prompt served twice: the hit cap recomputes its last block into a
    second copy; then one copy is evicted (vLLM's evict_blocks)."""
    ls = build_lockstep(["vllm-apc"], BS, 32, events=True)
    ls.finish(ls.begin(A))
    ls.finish(ls.begin(A))
    return ls


def test_vllm_removes_one_of_two_copies_and_says_the_block_is_gone():
    ls = vllm_two_copies()
    with pytest.raises(Divergence) as failure:
        ls.evict_value(1)
    assert failure.value.check == "events: removal while another copy is cached"
    assert "refcounting consumer stays consistent" in str(failure.value)


def test_a_refcounting_consumer_stays_consistent_where_a_plain_one_does_not():
    """Asked with one cut of the prompt, as the oracle asks its recent prompts at several
    steps: a repeated question is answered from the last answer until the next event."""
    from bcr_verify.dynamo_index import DynamoIndex, block_hashes

    adapter = resolve("vllm-apc").build(BS, 32, events=True)
    from bcr_verify.lockstep import Lockstep
    ls = Lockstep([adapter])  # no oracle: the raw stream, fed to three consumers
    consumers = [ReferenceIndex(BS, counting=True), ReferenceIndex(BS, counting=False),
                 DynamoIndex(BS, 0)]

    def feed():
        for event in adapter.take_events():
            for consumer in consumers:
                consumer.apply(event)
    cuts = [blocks_of(A, BS), blocks_of(A, BS), block_hashes(A, BS)]

    def asked():
        once = [c.held_of(cut) for c, cut in zip(consumers, cuts)]
        assert [c.held_of(cut) for c, cut in zip(consumers, cuts)] == once
        assert [c.held_blocks(A) for c in consumers] == once
        return once
    feed()
    assert asked() == [0, 0, 0]
    ls.finish(ls.begin(A))
    ls.finish(ls.begin(A))
    feed()
    assert asked() == [2, 2, 2]
    ls.evict_value(1)  # the older copy of the second block
    feed()
    assert ls.lanes[0].shadow.cached_blocks(A) == 2  # the cache still serves both blocks
    assert asked() == [2, 1, 1]
    # each time: the cut once (its repeat answered from the first), held_blocks's new cut once
    assert consumers[2].stats["dynamo_asked"] == 3 * 2


def test_an_index_files_blocks_whose_tokens_do_not_fit_in_64_bits():
    big = [2 ** 64 + i for i in range(BS)]
    index = ReferenceIndex(BS, counting=True)
    index.apply(Stored(hashes=(7, 8), parent=None, tokens=tuple(A[:BS] + big)))
    assert index.held_of(blocks_of(A[:BS] + big, BS)) == 2
    assert index.held_of(blocks_of(A[:BS] + big[:-1] + [0], BS)) == 1


def test_known_per_copy_removal_is_counted_and_the_rest_still_checked(tmp_path):
    result = run(RunConfig(implementations=["vllm-apc"], block_size=BS, max_steps=800,
                           events=True, trace_dir=str(tmp_path),
                           known=("events: removal while another copy is cached",)))
    assert result.failure is None, result.failure
    counts = result.totals["events"]["lanes"]["vllm-apc"]
    assert counts["blocks_stored"] and counts["index_checks"]


def test_a_cache_without_events_is_reported_silent():
    ls = build_lockstep(["reference", "sglang-radix"], BS, 32, events=True)
    scenario(ls)
    assert ls.report()["events"]["no_event_stream"] == ["reference"]


def test_factories_are_told_to_publish_events():
    seen = []

    def factory(spec: CacheSpec):
        seen.append(spec)
        return resolve("sglang-radix").build(spec.block_size, spec.capacity_pages, spec.events)
    import sys
    module = type(sys)("events_probe")
    module.factory = factory
    sys.modules["events_probe"] = module
    build_lockstep(["events_probe:factory"], BS, 32, events=True)
    assert seen == [CacheSpec(BS, 32, events=True)]
