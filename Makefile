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

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=10
