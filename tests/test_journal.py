"""The crash journal gives back exactly the steps written since the last fresh start."""

from bcr_verify import journal


def test_steps_come_back_as_written_with_prompts_named_once(tmp_path):
    path = tmp_path / "journal"
    log = journal.Journal(path)
    log.fresh({"implementations": ["old"]})
    log.step("reset", {})
    origin = {"implementations": ["reference"], "block_size": 4}
    log.fresh(origin)
    prompts = [[i, i + 1, i + 2] for i in range(journal.PROMPTS_KEPT + 3)] + [[2**70, 1]]
    steps = [{"op": "begin", "args": {"tokens": prompts[0]}}, {"op": "finish", "args": {"rid": 0}}]
    steps += [{"op": "match", "args": {"tokens": p}} for p in prompts]  # past the memo's bound
    steps += [{"op": "match", "args": {"tokens": prompts[0]}}, {"op": "evict", "args": {"num_tokens": 8}}]
    steps += [{"op": "reset", "args": {}}, {"op": "evict", "args": {"num_tokens": 2**64}},
              {"op": "odd", "args": {"a": 1, "b": [2]}}]  # past 64 bits, or not one int: JSON
    for step in steps:
        log.step(step["op"], step["args"])
    log.close()
    assert journal.read(path) == (origin, steps)
    data = path.read_bytes()
    first = journal._encode([0, 1, 2])[1]
    assert data.count(first) == 2  # once, then again only after the memo was cut
    assert b"[1180591620717411303424,1]" in data  # past 64 bits: a JSON list


def test_a_fresh_start_hides_what_came_before_and_the_journal_grows(tmp_path):
    path = tmp_path / "journal"
    log = journal.Journal(path)
    log.fresh({"implementations": ["reference"]})
    for rid in range(50):
        log.step("finish", {"rid": rid})
    log.step("match", {"tokens": [7, 8, 9]})
    log.fresh({"implementations": ["again"]})
    log.step("evict", {"num_tokens": 3})
    log.step("begin", {"tokens": [7, 8, 9]}, prompt=12)  # written again after the start
    assert journal.read(path) == ({"implementations": ["again"]},
                                  [{"op": "evict", "args": {"num_tokens": 3}},
                                   {"op": "begin", "args": {"tokens": [7, 8, 9]}}])
    long = [list(range(i, i + 5000)) for i in range(40)]  # 1.6 MB of prompts: past the map
    for tokens in long:
        log.step("match", {"tokens": tokens})
    assert path.stat().st_size > journal.MAPPED
    assert journal.read(path)[1][2:] == [{"op": "match", "args": {"tokens": t}} for t in long]
    log.close()


def test_a_torn_or_damaged_record_ends_the_journal(tmp_path):
    path = tmp_path / "journal"
    log = journal.Journal(path)
    log.fresh({"implementations": ["reference"]})
    log.step("match", {"tokens": [1, 2]})
    log.step("evict", {"num_tokens": 3})
    log.close()
    whole = path.read_bytes().rstrip(b"\0")
    first = [{"op": "match", "args": {"tokens": [1, 2]}}]
    for cut in range(1, 19):  # a journal copied short, or damaged past its first steps
        path.write_bytes(whole[:-cut])
        assert journal.read(path)[1] == first, cut
    path.write_bytes(whole[:-22] + b"J" + whole[-21:-17] + b"{not json" + bytes(8))
    assert journal.read(path)[1] == first
