# Feature Hedging companion.
#   make figures   create .venv if needed, then regenerate every figure (PROFILE=small by default)
#   make test      unit tests + notebook validation (nbval) on the fast `ci` profile (its own cache, data/cache/ci)
#   make lab       open JupyterLab on the notebooks
#   make html      render the executed notebooks (notebooks/executed/) and a figure/verdict index to build/html/
#   make browser-check  screenshots of build/html and JupyterLab running notebook 01 on ci, in headless Chromium
#   make benchmark toy training (SAELens one at a time vs batched), activation caching and LLM SAE training in float32 and bfloat16, against this machine's matmul speed
PYTHON ?= python3
PROFILE ?= small
# torch is installed first, pinned, so that the resolver never swaps in a multi-GB CUDA build.
# On a GPU machine, point it at the CUDA build you want: make env TORCH="torch==2.13.0 --index-url <CUDA wheel index>"
TORCH ?= torch==2.13.0
# sae-bench 0.6.0 declares numpy<2, datasets<4 and torchvision, which would pull a CUDA torch; its
# evaluations run with this environment's versions, so it is installed without its dependencies
# (the ones it needs, scikit-learn, threadpoolctl and tabulate, are in pyproject.toml).
SAE_BENCH ?= sae-bench==0.6.0
# sae-probes ships part of the offline corpus' text (data/corpus.toml) and the tasks of SAEBench's k-sparse
# probing; it declares xgboost (its CUDA build), hf-transfer and pyarrow<26, so it too installs without
# them: it imports xgboost, and pyproject.toml has xgboost-cpu for that.
SAE_PROBES ?= sae-probes==0.4.2
# make test runs its tests in this many processes (pytest-xdist), one thread each: most tests are
# small and dispatch-bound, so two single-threaded processes use two cores better than one process.
TEST_WORKERS ?= 2
VENV := .venv
BIN := $(VENV)/bin

.PHONY: env figures test unit notebooks lab html browser-check benchmark clean-cache

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(SAE_BENCH) $(SAE_PROBES)
	touch $@

figures: env
	$(BIN)/python -m hedging_utils.regenerate --profile $(PROFILE)

test: unit notebooks

unit: env
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

notebooks: env
	OMP_NUM_THREADS=1 HEDGING_PROFILE=ci HEDGING_CACHE_DIR=$(CURDIR)/data/cache/ci $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		--nbval-lax -p no:cacheprovider notebooks/[0-9][0-9]_*.ipynb

benchmark: env
	$(BIN)/python benchmarks/toy_training.py
	$(BIN)/python benchmarks/toy_step_profile.py
	$(BIN)/python benchmarks/activation_caching.py
	$(BIN)/python benchmarks/llm_training.py
	$(BIN)/python benchmarks/orthogonality_cost.py

lab: env
	$(BIN)/jupyter lab notebooks

html: env
	$(BIN)/python -m hedging_utils.reading html

browser-check: html
	$(BIN)/python -m hedging_utils.browser_check

clean-cache:
	rm -rf data/cache
