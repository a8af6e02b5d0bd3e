"""The crash journal gives back exactly the steps written since the last fresh start."""

from bcr_verify import journal


def test_steps_come_back_as_written_with_prompts_named_once(tmp_path):
    path = tmp_path / "journal.jsonl"
    log = journal.Journal(path)
    log.fresh({"implementations": ["old"]})
    log.step("reset", {})
    origin = {"implementations": ["reference"], "block_size": 4}
    log.fresh(origin)
    prompts = [[i, i + 1, i + 2] for i in range(journal.PROMPTS_KEPT + 3)] + [[2**70, 1]]
    steps = [{"op": "begin", "args": {"tokens": prompts[0]}}, {"op": "finish", "args": {"rid": 0}}]
    steps += [{"op": "match", "args": {"tokens": p}} for p in prompts]  # past the memo's bound
    steps += [{"op": "match", "args": {"tokens": prompts[0]}}, {"op": "evict", "args": {"num_tokens": 8}}]
    for step in steps:
        log.step(step["op"], step["args"])
    log.close()
    assert journal.read(path) == (origin, steps)
    text = path.read_text()
    first = journal._packed([0, 1, 2])["q"]
    assert text.count(first) == 2  # once, then again only after the memo was cut
    assert '"tokens":[1180591620717411303424,1]' in text  # past 64 bits: a JSON list


def test_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "journal.jsonl"
    log = journal.Journal(path)
    log.fresh({"implementations": ["reference"]})
    log.step("match", {"tokens": [1, 2]})
    log.close()
    with open(path, "a") as f:
        f.write('{"op": "ev')
    assert journal.read(path)[1] == [{"op": "match", "args": {"tokens": [1, 2]}}]
