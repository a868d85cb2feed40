# streamserve: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench bench-peers validate-stats lint docs compose-check deploy-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# constraints.txt pins every package to the version CI tested (torch==2.13.0, the CPU build on
	# these machines, as the `train` extra does): a fresh clone gets the same redis-py.
	$(BIN)/pip install -c constraints.txt -e '.[lab,peers,dev,docs,mlflow]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/streamserve demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/streamserve bench --out bench-results.json

# streamserve, FastAPI (raw body), Celery and the reference loop (lab/reference_loop.py) on one
# model and one machine: the ratios from one run, measured in alternating rounds.
bench-peers: $(STAMP)
	$(BIN)/streamserve bench-peers --out bench-peers-results.json

validate-stats: $(STAMP)
	$(BIN)/python -m experiments.validate

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The documentation site (mkdocs.yml) into site/; --strict: a broken link or anchor, a page left out of
# the nav or an API page mkdocstrings cannot render fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

compose-check:
	docker-compose -f docker-compose.yml config --quiet && echo "docker-compose.yml is valid"

# Offline: compose config, promtool check/test of the alert rules, Kubernetes + KEDA schemas (docs/deployment.md).
deploy-check: $(STAMP)
	$(BIN)/python -m deploy.check

clean:
	rm -rf $(VENV) var bench-results.json bench-peers-results.json .pytest_cache .mypy_cache
