# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# `make test-floors` runs the fast tests on the oldest supported stack (constraints-floors.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_FLOORS ?= .venv-floors
PY_FLOORS := $(VENV_FLOORS)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
# One line naming the versions a test run uses (so a CI log says what it tested).
SHOW_VERSIONS := -c "import sys, torch, torchvision, timm, PIL, numpy; print('versions: python', sys.version.split()[0], '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__, '| Pillow', PIL.__version__, '| numpy', numpy.__version__)"

.PHONY: demo test test-floors lint setup setup-floors dataset-package clean-demo

# A virtualenv with requirements.txt, re-made when the requirements change.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# The floors: requirements.txt with every direct requirement pinned to its lower bound. Re-made
# from scratch when either file changes, so nothing newer is left over from an earlier build.
$(VENV_FLOORS)/.installed: requirements.txt constraints-floors.txt
	rm -rf $(VENV_FLOORS)
	$(PYTHON) -m venv $(VENV_FLOORS)
	$(PY_FLOORS) -m pip install --upgrade --quiet pip
	$(PY_FLOORS) -m pip install --quiet -r requirements.txt -c constraints-floors.txt
	touch $@

setup-floors: $(VENV_FLOORS)/.installed

# Debian's dataset-fashion-mnist ships the four original idx files; install it when missing.
dataset-package:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

# Train tiny-MOAT-0 on Fashion-MNIST through main.py, validate on the full 10k test set.
demo: setup dataset-package
	$(PY) tools/demo_fashion_mnist.py --python $(PY)

# The test suite, exactly as CI runs it (`pytest -m "not slow"` is the fast tier for everyday work),
# in TEST_JOBS processes (pytest-xdist): most tests use one core, so two halve the time on 2 cores.
TEST_JOBS ?= 2
test: setup dataset-package
	@$(PY) $(SHOW_VERSIONS)
	$(PY) -m pytest tests -q -p no:cacheprovider -n $(TEST_JOBS)

# ruff lint and format check (settings in pyproject.toml); `ruff format .` fixes the formatting.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The fast tier of the suite on the oldest supported versions (what .ci/run runs second).
test-floors: setup-floors dataset-package
	@$(PY_FLOORS) $(SHOW_VERSIONS)
	$(PY_FLOORS) -m pytest tests -q -p no:cacheprovider -m "not slow" -n $(TEST_JOBS)

clean-demo:
	rm -rf output/demo data_cache
