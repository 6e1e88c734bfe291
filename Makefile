# gmix_jax developer entry points.
#   make venv   create .venv (if missing) and install pinned deps + the package (editable)
#   make test   run the test suite (the README's / CI's test command)
#   make test-fast  the suite without the tests marked `slow` (the edit-test loop)
#   make demo   short training run with the default config
#   make clean  remove .venv, build metadata and caches (keeps workdirs/)
# Override the interpreter with e.g. `make PYTHON=python3.12 test`.

PYTHON   ?= python3
VENV     ?= .venv
VENV_PY  := $(VENV)/bin/python
# Stamp: re-install only when requirements.txt or pyproject.toml change
# (or the venv is deleted), so a second `make test` does not reinstall.
STAMP    := $(VENV)/.gmix_jax-installed
CONFIG   ?= configs/default.py
WORKDIR  ?= workdirs/default
PYTEST_ARGS ?= -n 2

.PHONY: venv test test-fast demo clean

venv: $(STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(VENV_PY)
	$(VENV_PY) -m pip install -r requirements.txt
	$(VENV_PY) -m pip install -e . --no-deps
	touch $@

test: venv
	$(VENV_PY) -m pytest -q tests$(if $(PYTEST_ARGS), $(PYTEST_ARGS))

test-fast: venv
	$(VENV_PY) -m pytest -q tests -m "not slow"$(if $(PYTEST_ARGS), $(PYTEST_ARGS))

demo: venv
	$(VENV_PY) -m gmix_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
