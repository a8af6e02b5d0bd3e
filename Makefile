# The two commands of the README. Both set up .venv first (idempotent, see ci/setup.sh).
.PHONY: verify test setup

setup:
	@bash ci/setup.sh

# --events: every implementation that publishes KV events is checked (docs/events.md); vLLM's
# per-copy BlockRemoved is a known upstream inconsistency, counted with a witness, not a finding.
verify: setup
	.venv/bin/bcr-verify run --events --known "events: removal while another copy is cached" \
		--json reports/run.json --trace-dir reports/traces

test: setup
	.venv/bin/python -m pytest -q
