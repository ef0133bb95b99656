# Two entry points, both self-contained and idempotent on a fresh machine:
#   make demo   - set up, then run the offline quickstart (experiments/quickstart.yaml)
#   make test   - set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test bench data setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

data:
	@scripts/ensure_data.sh

demo: setup data
	$(BIN)/cl sweep experiments/quickstart.yaml

test: setup data
	$(BIN)/python -m pytest

bench: setup data
	$(BIN)/python experiments/bench/er_vs_avalanche.py

clean:
	rm -rf $(VENV) runs
