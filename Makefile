# The two commands of the README. Both set up .venv first (idempotent, see ci/setup.sh).
.PHONY: verify test setup

setup:
	@bash ci/setup.sh

verify: setup
	.venv/bin/bcr-verify run --json reports/run.json

test: setup
	.venv/bin/python -m pytest -q
