"""The head-to-head benchmark: same stream for every implementation, table and plot."""

from bcr_verify.bench import bench, markdown, overlap_prompts, plot


def test_overlap_prompts_share_the_requested_fraction():
    pool = overlap_prompts(0.5, seed=0, count=8, length=100, groups=2)
    assert all(len(p) == 100 for p in pool)
    assert pool[0][:50] == pool[2][:50] and pool[0][50:] != pool[2][50:]
    assert pool[0][:50] != pool[1][:50]


def test_short_bench_table_and_plot(tmp_path):
    report = bench(["reference", "sglang-radix"], block_size=16, requests=60,
                   sweep_requests=30, workloads=("disjoint",), ratios=(0.1, 0.9))
    rows = report["workloads"]["disjoint"]["results"]
    for impl in ("reference", "sglang-radix"):
        lat = rows[impl]["latency"]
        assert lat["match"]["n"] > 0 and lat["insert"]["n"] > 0 and lat["lock"]["n"] > 0
        assert lat["match"]["p50_us"] <= lat["match"]["p99_us"]
    # identical streams: same hits on the same prompts where nothing was evicted differently
    sweep = report["overlap_sweep"]
    assert sweep["0.9"]["reference"]["hit_rate"] > sweep["0.1"]["reference"]["hit_rate"]
    text = markdown(report)
    assert "| reference |" in text and "| sglang-radix |" in text and "overlap" in text
    plot(report, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 1000
