# keras-lora: `make demo` runs the main job, `make test` the suite on all three backends.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BACKENDS := jax tensorflow torch
# torch 2.13.0 is the CPU wheel on the machine's disk; anything else pulls gigabytes.
TORCH_PIN := torch==2.13.0

.PHONY: install test test-serial test-jax test-tensorflow test-torch demo demo-hub bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[all,test]"
	touch $@

# The backends' suites run side by side (tools/run_suites.py: each is
# mostly single-threaded Python, and JAX's and TensorFlow's, the longest, run as two
# processes); `make test-serial` runs them one after another.
test: install
	$(PY) tools/run_suites.py --backends $(BACKENDS)

test-serial: install
	@status=0; for b in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$b ==="; \
	  KERAS_BACKEND=$$b $(PY) -m pytest -q -p no:cacheprovider tests || status=1; \
	done; exit $$status

test-%: install
	KERAS_BACKEND=$* $(PY) -m pytest -q -p no:cacheprovider tests

demo: install
	$(PY) examples/quickstart.py

demo-hub: install
	$(PY) examples/minilm_text_classifier.py

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
