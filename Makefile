# SoftCAM Review — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export SOFTCAM_HOME ?= $(CURDIR)/.softcam
PORT   ?= 8501

.PHONY: run test test-slow test-all bench demo venv test-deps chromium clean device-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install whenever a requirements file or the project metadata changes.
$(VENV)/.installed: $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/pip install --progress-bar on -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(BIN)/pip install --progress-bar on -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

# Debian's chromium drives the browser tests (Playwright's own browser download does not work offline).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "Installing Debian's chromium for the browser tests..."; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null \
	  || echo "WARNING: could not install chromium; browser tests will skip"; }

test-deps: $(VENV)/.installed-test chromium

# Demo cohort (all three modalities) and demo models, made once under $(SOFTCAM_HOME), with progress.
demo: venv
	$(BIN)/softcam demo --home "$(SOFTCAM_HOME)"

run: demo
	@echo "First start: the admin's random password goes to first-admin-password in the key folder (path printed below)."
	$(BIN)/streamlit run app.py --server.port $(PORT) --server.headless true --browser.gatherUsageStats false

test: test-deps
	$(BIN)/python -m pytest

test-slow: test-deps
	$(BIN)/python -m pytest -m slow

test-all: test-deps
	$(BIN)/python -m pytest -m "slow or not slow"

bench: test-deps  # the Review latency benchmark drives Chromium through Playwright
	$(BIN)/python -m bench

# Wheels for bench/device.sh: what a lent GPU machine (no network, Python 3.12) lacks for the benchmarks.
DEVICE_WHEELS := captum==0.9.0 torchcam==0.5.0 ttach==0.0.3 plotly==7.1.0 pydicom==3.0.2 SQLAlchemy==2.1.9 \
                 alembic==1.20.1 Mako greenlet
device-wheels: venv
	mkdir -p .whl
	$(BIN)/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(DEVICE_WHEELS)
	$(BIN)/pip wheel --no-deps -w .whl grad-cam==1.5.7  # published as a source archive only

clean:
	rm -rf $(VENV) .pytest_cache
