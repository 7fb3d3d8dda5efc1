# The few commands people run. CI (.ci/run) uses the same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv install pki run test policy-test lint format typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python

## install: the package with its test and dev extras into .venv
install: venv
	$(BIN)/pip install -q '.[dev]'

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

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp* etc/pki etc/audit.jsonl
