# Two entry points for a newcomer: `make demo` and `make test` (see README.md).
# Both create .venv on first use and install the package from this checkout with the
# versions pinned in requirements/ci-constraints.txt (torch==2.13.0: CI's machines take
# the CPU build, 2.13.0+cpu, from a local wheel; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu, or pip takes PyPI's
# multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/ci-constraints.txt
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS)

.PHONY: demo test docs paper venv bench validate-smoke validate-small clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The stamps depend on pyproject.toml and the constraints: editing either reinstalls.
$(VENV)/.demo-installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP_INSTALL) -e ".[torch,cvxpy,plot]"
	touch $@

$(VENV)/.all-installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP_INSTALL) -e ".[all]"
	touch $@ $(VENV)/.demo-installed

venv: $(VENV)/.all-installed

demo: $(VENV)/.demo-installed
	$(PY) -m clairstat.demo --output demo_output

# pytest exits 5 when it collects nothing; say so instead of leaving a bare code.
test: $(VENV)/.all-installed
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$rc

# The documentation site: Sphinx with warnings as errors; every example of the gallery
# (examples/) is executed. Output: docs/_build/html/index.html.
docs: $(VENV)/.all-installed
	$(PY) -m sphinx -W --keep-going -b html -d docs/_build/doctrees docs docs/_build/html
	@echo "make docs: open docs/_build/html/index.html"

# The manuscript: every figure redrawn from the saved tables, its numbers and tables
# written to paper/generated/ from the committed results, then latexmk (TeX Live from
# Debian's packages, see README.md, "Paper"). Nothing is simulated.
# Output: paper/build/clairstat.pdf.
paper: $(VENV)/.all-installed
	$(PY) -m paper --scale small --pdf

bench: $(VENV)/.all-installed
	$(PY) benchmarks/solver_benchmark.py

validate-smoke: $(VENV)/.all-installed
	$(PY) -m validation --scale smoke

validate-small: $(VENV)/.all-installed
	$(PY) -m validation --scale small

clean:
	rm -rf $(VENV) demo_output .pytest_cache docs/_build docs/generated docs/auto_examples \
		docs/sg_execution_times.rst
