# `make demo` and `make test` each create .venv when it is missing and install the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.erasekit-installed

.PHONY: install demo test docs lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/erasekit demo --out demo-output --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf demo-output .pytest_cache site
