# The two commands of the README: `make demo` and `make test` do all set-up themselves.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of PyTorch where a local one exists. GPU users: `make test TORCH=torch` (or install
# any torch into .venv first: an importable torch is kept as it is).
TORCH ?= torch==2.13.0
EXTRAS ?= test,ray,parquet
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

# fla-core: flash-linear-attention's pure-PyTorch delta rule, the tests' external oracle and the
# bench's fla column (loaded by path, installed without its GPU dependencies; optional).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/pip install --quiet --no-deps fla-core==0.6.0 einops \
		|| echo "fla-core not installed: its oracle tests and bench column are skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python run_retrieval.py demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

# ORIGINAL=path/to/fast-weight-transformers/synthetic also times the authors' code here;
# PASSES=N times the paper configurations N times and keeps each figure's minimum.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(if $(ORIGINAL),--original "$(ORIGINAL)") $(if $(PASSES),--passes $(PASSES))

clean:
	rm -rf $(VENV) build *.egg-info
