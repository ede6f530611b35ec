# Two entry points for a newcomer: `make demo` and `make test`. Both set everything up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# torch + torchvision pair that imports together; installed by pip so that a local
# wheel cache or a site-wide pip configuration is honoured. Everything else is pinned
# in requirements.lock and installed by uv, which is several times faster.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The torch stack is installed above, not from the lock.
TORCH_STACK := '^(torch|torchvision|triton|nvidia-|cuda-)'
DEMO_OUT ?= out/demo

.PHONY: install demo test lint lock browser bench clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_PINS) uv==0.13.9
	$(UV) pip install -q --compile-bytecode --python $(PY) --no-deps -r requirements.lock
	$(UV) pip install -q --python $(PY) --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Headless Chromium for the report's browser test (Debian/Ubuntu, as root); skipped elsewhere.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the browser test will be skipped"

demo: install
	$(PY) -m engine.demo --out $(DEMO_OUT)

test: install browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) tests/bench/bench_ingest_export.py

# Pin what pyproject.toml added after a change to its dependencies; every pin already in
# requirements.lock is kept (uv prefers the versions of its output file).
lock:
	$(UV) pip compile pyproject.toml --extra dev --extra demo --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -q -o requirements.lock
	grep -Ev $(TORCH_STACK) requirements.lock > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) out
