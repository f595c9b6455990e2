# The two commands of the README's quick start. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard lithos_ray/proto/*.proto native/Makefile native/*.c native/*.h)

$(STAMP): $(BUILD_INPUTS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

.PHONY: demo test install
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lithos-ray demo

# The dashboard test drives a real headless Chromium (Debian's package; skipped with a reason without it).
test: $(STAMP)
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1)) || true
	$(VENV)/bin/python -m pytest -q --durations=10
