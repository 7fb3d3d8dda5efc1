# The few commands people run. CI (.ci/run) uses the same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv install upgrade-constraints pki run test policy-test lint format typecheck bench sdist-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python

## install: the package with its test and dev extras into .venv, at the pinned versions
install: venv
	$(BIN)/pip install -q -c constraints.txt '.[dev]'

## upgrade-constraints: re-pin constraints.txt to the newest versions, from a fresh venv
upgrade-constraints:
	rm -rf .constraints-venv
	$(PYTHON) -m venv .constraints-venv
	.constraints-venv/bin/pip install -q --upgrade pip
	.constraints-venv/bin/pip install -q '.[dev]'
	{ echo "# Pinned versions of everything 'pip install .[dev]' installs; used by 'make install'."; \
	  echo "# Regenerate with 'make upgrade-constraints'."; \
	  .constraints-venv/bin/pip freeze --all --exclude-editable | grep -Ev '^(pip|setuptools|promgate)( @|==)'; } > constraints.txt
	rm -rf .constraints-venv

## pki: a development CA, gate and client certificates and an audit key in etc/pki
pki: install
	$(BIN)/promgate pki init etc/pki --identity prometheus --identity ops

## run: start promgate in the foreground with the shipped example configuration
run: pki
	$(BIN)/promgate check-config etc/promgate.yaml
	$(BIN)/twistd -n --pidfile= promgate --config etc/promgate.yaml

## policy-test: check the shipped example's policy against etc/policy-tests.yaml
policy-test: pki
	$(BIN)/promgate test-policy etc/policy-tests.yaml

## test: the whole trial suite (unit, integration, end to end)
test: install
	$(BIN)/python -m twisted.trial tests

lint: install
	$(BIN)/ruff check promgate tests bench twisted
	$(BIN)/ruff format --check promgate tests bench twisted

format: install
	$(BIN)/ruff format promgate tests bench twisted
	$(BIN)/ruff check --fix promgate tests bench twisted

typecheck: install
	$(BIN)/mypy promgate

## bench: gateway vs direct vs HAProxy (needs haproxy, wrk; see bench/README.md)
bench: install
	$(BIN)/python bench/scrape_bench.py

## sdist-check: build the source distribution, check its contents, run tests from it
sdist-check: install
	$(BIN)/python -m twisted.trial tests.test_sdist

clean:
	rm -rf $(VENV) .constraints-venv build dist *.egg-info _trial_temp* etc/pki etc/audit.jsonl
