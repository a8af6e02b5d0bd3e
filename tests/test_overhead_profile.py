"""ci/overhead_profile.py sorts py-spy's samples of a soak by where they were; the floor it
reports in docs/benchmarks.md §4.1 is only as good as that sorting, so it is checked here on
stacks shaped as py-spy writes them (running py-spy itself needs ptrace, which CI may lack)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("overhead_profile", ROOT / "ci/overhead_profile.py")
profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile)

LOOP, TIMED = profile.loop_lines(), profile.timed_lines()
OUTSIDE_LOOP = LOOP.start - 5
UNTIMED = TIMED.start - 2


def stack(*frames, soak_line=LOOP.start + 3):
    head = ["_run_module_as_main (<frozen runpy>:198)", "cmd_soak (bcr_verify/soak.py:786)",
            f"soak (bcr_verify/soak.py:{soak_line})"]
    return ";".join(head + list(frames))


def guarded(line, *below):
    return ["Lockstep._end (bcr_verify/lockstep.py:629)",
            f"_guarded.<locals>.call (bcr_verify/guard.py:{line})", *below]


def test_each_sample_is_sorted_by_where_it_was(tmp_path):
    raw = tmp_path / "profile.raw"
    raw.write_text("\n".join([
        stack(*guarded(TIMED.start, "_PyEval_EvalFrameDefault (libpython3.11.so)",
                       "SGLangAdapter.insert (bcr_verify/adapters/sglang.py:160)",
                       "RadixCache.insert (radix_cache.py:400)")) + " 7",
        stack(*guarded(TIMED.start)) + " 1",  # the call itself, inside the timed part
        stack(*guarded(TIMED.start, "SGLangAdapter.check_invariants "
                                    "(bcr_verify/adapters/sglang.py:200)")) + " 2",
        stack(*guarded(UNTIMED, "time_monotonic_ns (libpython3.11.so)")) + " 3",
        stack("Lockstep._end (bcr_verify/lockstep.py:630)",
              "CPyDef_ReferenceCache___insert_blocks (__native_reference.c:8061)") + " 4",
        stack("Lockstep._evict_lru (bcr_verify/lockstep.py:682)",
              "ReferenceCache.apply_lru_eviction (bcr_verify/models/reference.py:420)") + " 1",
        stack("Lockstep._step (bcr_verify/lockstep.py:410)", "gc_collect_main (libpython)") + " 5",
        stack("Lockstep._step (bcr_verify/lockstep.py:410)") + " 6",
        stack("PromptDrawer.draw (bcr_verify/soak.py:85)") + " 8",
        stack("select_implementations (bcr_verify/runner.py:132)", soak_line=OUTSIDE_LOOP) + " 50",
    ]) + "\n")
    assert profile.classify(raw) == {"implementations": 8, "self-checks": 2, "guard": 3,
                                     "model": 5, "collector": 5, "lockstep": 6, "soak": 8}


def test_the_landmarks_it_sorts_by_are_still_where_it_looks():
    """The soak's loop and the guard's timed call, found by their syntax: if either moved
    into another function, the profile would see no loop or no implementation time."""
    soak_source = (ROOT / "bcr_verify/soak.py").read_text().splitlines()
    assert soak_source[LOOP.start - 1].strip() == "while True:"
    guard_source = (ROOT / "bcr_verify/guard.py").read_text().splitlines()
    assert guard_source[TIMED.start - 1].strip() == "return original(*args)"
