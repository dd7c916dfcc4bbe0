# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: demo test setup dataset-package clean-demo

# A virtualenv with requirements.txt, re-made when the requirements change.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# Debian's dataset-fashion-mnist ships the four original idx files; install it when missing.
dataset-package:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

# Train tiny-MOAT-0 on Fashion-MNIST through main.py, validate on the full 10k test set.
demo: setup dataset-package
	$(PY) tools/demo_fashion_mnist.py --python $(PY)

# The test suite, exactly as CI runs it.
test: setup dataset-package
	$(PY) -m pytest tests -q -p no:cacheprovider

clean-demo:
	rm -rf output/demo data_cache
