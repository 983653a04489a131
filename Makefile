# ovjax: two commands do all the set-up on a fresh machine.
#   make demo   creates .venv if missing, installs, runs the embedded end-to-end demo on CPU
#   make test   the same set-up, then the test suite (CPU; fake devices for sharding)
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.ovjax-installed
PYTEST_ARGS ?=

.PHONY: demo test install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,parity]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ovjax demo

# pytest exits 5 when it collected no test; make treats every non-zero exit as a failure.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
