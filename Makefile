# The README's two commands: `make demo` (main job on the built-in default) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp depends on the files that define the install, so a second run installs nothing.
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test install docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev,tts,docs]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m expmae.demo

clean:
	rm -rf $(VENV) build site *.egg-info

# The documentation site, built as CI builds it (broken links, missing pages, unresolved API entries fail).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict
