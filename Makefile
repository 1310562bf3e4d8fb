# `make train` and `make test` each create .venv (if missing), install the pinned requirements,
# then train the default experiment / run the test suite. ARGS passes Hydra overrides to train.py.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast gpu-test gpu-check benchmark clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

train: install
	$(PY) train.py $(ARGS)

test: install
	$(PY) -m pytest -m "not gpu" -q --durations=25 $(ARGS)

test-fast: install
	$(PY) -m pytest -m "not gpu and not slow" -q $(ARGS)

gpu-test: install
	$(PY) -m pytest -m gpu -q $(ARGS)

# GPU readiness: the gpu-marked tests, then the MFU benchmark (one JSON object; both run even if the
# tests fail, and the target fails if either did). Without CUDA both skip and it passes. Installs
# nothing: it uses .venv if there is one, else $(PYTHON) with its preinstalled torch.
gpu-check:
	@py=$(PY); test -x $$py || py=$(PYTHON); status=0; \
	$$py -m pytest -m gpu -q -rs $(ARGS) || status=$$?; \
	$$py benchmarks/mfu.py || status=$$?; exit $$status

benchmark: install
	$(PY) benchmarks/train_overhead.py $(ARGS)

clean:
	rm -rf logs data/cache
