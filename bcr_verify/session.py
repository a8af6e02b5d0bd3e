"""The engine's front door: build lanes by name, size pools from workloads, run and report.

The CLI, the pytest plugin and the machine all come through here, so a run from any of them
is configured, sized and reported the same way.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from hypothesis import strategies as st

from bcr_verify.adapters.registry import resolve
from bcr_verify.errors import AdapterUnavailable, SetupError, UsageError
from bcr_verify.guard import DEFAULT_OP_TIMEOUT
from bcr_verify.lockstep import Lockstep, StepBudget


def build_lockstep(implementations: Sequence[str], block_size: int, capacity_pages: int,
                   kv_replay: bool = False, check_every: int = 1,
                   op_timeout: float | None = DEFAULT_OP_TIMEOUT,
                   budget: StepBudget | None = None, strict_lru: bool = False,
                   events: bool = False) -> Lockstep:
    """Lanes for ``implementations`` (names or ``module:attr``) sharing one configuration;
    ``events``: each built with its KV-cache event stream on, checked by
    :class:`~bcr_verify.events.EventsOracle`."""
    adapters = build_adapters(implementations, block_size, capacity_pages, events)
    observers = []
    if events:
        from bcr_verify.events import EventsOracle
        observers.append(EventsOracle(dynamo=dynamo_available()))
    if kv_replay:
        from bcr_verify.kv_replay import KVReplay
        observers.append(KVReplay(block_size, model=_replay_model()))
    origin = {"implementations": list(implementations), "block_size": block_size,
              "capacity_pages": capacity_pages, "kv_replay": kv_replay, "strict_lru": strict_lru,
              "events": events}
    return Lockstep(adapters, check_every=check_every, observers=observers,
                    op_timeout=op_timeout, origin=origin, budget=budget, strict_lru=strict_lru)


def start_afresh(lockstep: Lockstep) -> None:
    """Every lane of ``lockstep`` (made by :func:`build_lockstep`) on a fresh cache built as
    its own was (:meth:`Lockstep.renew`): what a soak does after a known failure, and its
    shrinker's replays with it."""
    origin = lockstep.origin
    lockstep.renew(build_adapters(origin["implementations"], origin["block_size"],
                                  origin["capacity_pages"], origin["events"]))


def build_adapters(implementations: Sequence[str], block_size: int, capacity_pages: int,
                   events: bool = False) -> list:
    """A fresh cache of each of ``implementations``, as :func:`build_lockstep` builds its
    lanes' (and :func:`start_afresh` builds them again)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise UsageError(f"block_size must be a positive int, got {block_size!r}")
    if not implementations:
        raise UsageError("implementations: name at least one (see `bcr-verify impls`)")
    try:
        return [resolve(name).build(block_size, capacity_pages, events)
                for name in implementations]
    except AdapterUnavailable as exc:  # available, but not with what was asked of it
        raise SetupError(f"impl: {exc}") from None


@functools.lru_cache(maxsize=1)
def dynamo_available() -> bool:
    """Dynamo's RadixTree (``ai-dynamo-runtime``) is installed: events also feed it."""
    try:
        import bcr_verify.dynamo_index  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _replay_model():
    """One tiny model per process: every example's replay shares it and its recompute cache."""
    from bcr_verify.kv_replay import ReplayModel
    return ReplayModel()


@dataclass(frozen=True)
class PromptSource:
    strategy: st.SearchStrategy
    pool: tuple[tuple[int, ...], ...]
    capacity_pages: int


@functools.lru_cache(maxsize=None)
def prompt_source(workload: str, block_size: int, seed: int = 0) -> PromptSource:
    """Prompts for ``workload`` and a pool size that forces evictions but admits any prompt.

    The pool holds about three of the longest prompts: enough that a request always fits
    after evicting, few enough that a handful of requests overflow it.
    """
    from bcr_verify.strategies import build_workload, load_tokenizer, prompts

    pool = [list(p) for p in build_workload(workload, load_tokenizer(), seed=seed)]
    longest = max(len(p) for p in pool)
    capacity = 3 * math.ceil(longest / block_size) + 4
    return PromptSource(prompts(pool, block_size), tuple(map(tuple, pool)), capacity)


@dataclass
class Totals:
    """Counts summed over every example a run executed (each example has fresh lanes)."""

    examples: int = 0
    steps: int = 0
    shrink_examples: int = 0
    tree_shape: dict = field(default_factory=dict)
    """Per lane, the deepest and widest tree reached (see :mod:`bcr_verify.shape`)."""
    operations: Counter = field(default_factory=Counter)
    rejected_requests: int = 0
    cross_lane_checks: int = 0
    per_impl: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def add(self, lockstep: Lockstep, example: bool = True) -> None:
        """Add ``lockstep``'s counts; ``example=False`` for lanes an example replaced midway."""
        report = lockstep.report()
        self.examples += example
        self.steps += report.pop("steps")
        self.operations.update(report.pop("operations"))
        self.rejected_requests += report.pop("rejected_requests")
        self.cross_lane_checks += report.pop("cross_lane_checks")
        for name, stats in report.pop("implementations").items():
            mine = self.per_impl.setdefault(name, {"contract": stats["contract"],
                                                   "notes": stats.get("notes", {})})
            for key, value in stats.items():
                if isinstance(value, (int, float)) and key != "hit_rate":
                    mine[key] = mine.get(key, 0) + value
                elif isinstance(value, dict) and key in ("ops", "lru_deviations"):
                    mine.setdefault(key, Counter()).update(value)
                elif key == "lru_witnesses":  # keep the shortest witness of each
                    kept = mine.setdefault(key, {})
                    for name, steps in value.items():
                        if name not in kept or len(steps) < len(kept[name]):
                            kept[name] = steps
        for key, value in report.items():  # observers' sections
            add_section(self.extra.setdefault(key, {}), value)

    def reset(self) -> None:
        self.__init__()

    def _observer_sections(self) -> dict:
        out = {}
        for key, section in self.extra.items():
            section = dict(section)
            if section.get("replayed") and "check_seconds" in section:
                section["ms_per_replay"] = round(1000 * section["check_seconds"] /
                                                 section["replayed"], 3)
            out[key] = section
        return out

    def as_dict(self) -> dict:
        impls = {}
        for name, stats in self.per_impl.items():
            stats = dict(stats)
            stats["ops"] = dict(stats.get("ops", {}))
            stats["lru_deviations"] = dict(stats.get("lru_deviations", {}))
            lookups = stats.get("lookup_tokens", 0)
            stats["hit_rate"] = round(stats.get("hit_tokens", 0) / lookups, 4) if lookups else 0.0
            impls[name] = stats
        return {"examples": self.examples, "steps": self.steps,
                "shrink_examples": self.shrink_examples, "tree_shape": self.tree_shape,
                "operations": dict(self.operations), "rejected_requests": self.rejected_requests,
                "cross_lane_checks": self.cross_lane_checks,
                "implementations": impls, **self._observer_sections()}


def add_section(mine: dict, section: dict) -> None:
    """One observer's report ``section`` added into ``mine``, its sum so far: counts add
    (:data:`SUMMED`, and :data:`PER_LANE` lane by lane), maxima max, settings as last said."""
    for k, v in section.items():
        if k.startswith("max_") and v is not None:
            mine[k] = v if mine.get(k) is None else max(mine[k], v)
        elif k in SUMMED and v is not None:
            mine[k] = mine.get(k, 0) + v
        elif k in PER_LANE:
            for lane, counts in v.items():
                mine.setdefault(k, {}).setdefault(lane, Counter()).update(counts)
        else:
            mine[k] = v


SUMMED = {"hits", "replayed", "skipped", "failures", "replayed_tokens", "written_tokens",
          "seconds", "check_seconds"}
"""Observer report fields that are per-example counts; others are settings or running totals."""
PER_LANE = {"lanes"}
"""Observer report fields holding counts per lane, summed lane by lane."""

TOTALS = Totals()


def vacuity_warnings(totals: dict, implementations: dict[str, str]) -> list[str]:
    """Why a pass might mean little: no hits, no evictions, implementations not run."""
    warnings = [f"{name} was not run: {why}" for name, why in implementations.items()]
    for name, stats in totals.get("implementations", {}).items():
        if not stats.get("hits"):
            warnings.append(f"{name}: zero cache hits, so matching was never exercised")
        if not stats.get("evictions"):
            warnings.append(f"{name}: zero evictions, so eviction was never exercised")
        if stats.get("contract", {}).get("duplicates") == "kept" and not stats.get(
                "duplicates_kept"):
            warnings.append(f"{name}: no block was ever held in two copies, so duplicate "
                            "copies were never exercised")
    events = totals.get("events") or {}
    for name, counts in events.get("lanes", {}).items():
        if not counts.get("blocks_stored"):
            warnings.append(f"{name}: published no stored-block event, so its event stream "
                            "was never exercised")
        if not counts.get("blocks_removed"):
            warnings.append(f"{name}: published no removed-block event")
    if events and not events.get("dynamo"):
        warnings.append("events were not fed to Dynamo's RadixTree (ai-dynamo-runtime is not "
                        "installed)")
    if len(totals.get("implementations", {})) > 1 and not totals.get("cross_lane_checks"):
        warnings.append("no lookup compared lanes with each other (each lane was still "
                        "judged by its own model)")
    if not totals.get("steps"):
        warnings.append("no steps ran")
    return warnings


def known_not_seen(known: Sequence[str], found: dict) -> list[str]:
    """The checks given as known that never failed in what ran: fixed where this ran, or not
    the name a failure shows in [brackets]. Said out loud, so a misspelt ``--known`` does not
    pass as a search that looked past that failure."""
    return [check for check in dict.fromkeys(known) if check not in found]


def known_not_seen_line(check: str) -> str:
    return (f"KNOWN, NOT SEEN: {check!r} never failed in this run: fixed here, or not the name "
            "a failure shows in [brackets]")


def progress_printer(stream=sys.stderr) -> Callable[[str], None]:
    """One updating line on a terminal, plain lines otherwise (CI logs)."""
    tty = stream.isatty()
    last = [0.0]

    def show(text: str, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - last[0] < (0.2 if tty else 10):
            return
        last[0] = now
        stream.write(("\r\033[K" + text + ("\n" if final else "")) if tty else text + "\n")
        stream.flush()

    return show
