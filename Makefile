# Two commands set up everything on a fresh machine: `make figures` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: figures test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[cpu,plot,test,train]'
	touch $(STAMP)

figures: $(STAMP)
	$(PY) analysis/convergence.py
	$(PY) analysis/contraction.py
	$(PY) analysis/newton_family.py
	$(PY) analysis/approx_depth.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) analysis/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
