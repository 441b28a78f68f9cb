# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tfkd-installed

.PHONY: install demo test clean

# Create the virtual environment if missing and install tfkd with every extra.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || (command -v $(PYTHON) >/dev/null && $(PYTHON) -m venv $(VENV)) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev,compress]'
	@touch $(STAMP)

install: $(STAMP)

# The main job on the bundled offline default (scikit-learn's digits).
demo: install
	$(PY) -m tfkd.train --run-dir runs/demo

# The test suite. Real-CIFAR tests read TFKD_CIFAR10_DIR (skipped when unset, outside CI).
test: install
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
