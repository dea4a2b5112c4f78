# The two commands a fresh clone needs: `make run` and `make test`. Everything else is a step of them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RECSYS := $(VENV)/bin/recsys
ARTIFACTS ?= artifacts
DATA ?= synthetic
STAGE ?= pipeline
# What make installs: the lock (exact versions, made from pyproject.toml's ranges by
# scripts/lock.sh): the core, the CPU model runtimes, object-store clients, torch (the tests train
# tiny models), the test, deploy-check and bench tools; then the project itself, without deps.
LOCK ?= requirements/dev.txt
# The lock's torch==2.13.0+cpu is on PyTorch's CPU index, not on PyPI (whose Linux torch is the
# CUDA build); the index is skipped when a local wheel folder (PIP_FIND_LINKS) already has it.
TORCH_INDEX ?= $(if $(wildcard $(addsuffix /torch-*+cpu-*.whl,$(PIP_FIND_LINKS))),,https://download.pytorch.org/whl/cpu)
PROTOS := $(wildcard protos/recsys/v1/*.proto)
STUBS := recsys/v1/__init__.py
INSTALLED := $(VENV)/.installed
# buf (proto lint and breaking-change checks, tests/test_contract.py) from the npm registry, pinned,
# into the ignored .tools/. BUF_AGAINST: the git ref whose protos `buf breaking` compares with
# (origin/<ref> when there is no local branch of that name).
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
BUF_AGAINST ?= main

.PHONY: install protos buf run test test-slow lint eval eval-seeds train-bench recipe-bench bench data train export serve clean system-deps format gpu-check

install: $(INSTALLED) $(STUBS)

$(INSTALLED): pyproject.toml setup.py $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Generated gRPC stubs: one package (recsys.v1) imported by every service; never edited by hand.
protos: $(STUBS)
$(STUBS): $(PROTOS) $(INSTALLED)
	rm -rf recsys/v1
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

# buf for the contract checks; without npm, or when the install fails (offline), the checks skip
# with the reason rather than failing `make test`.
buf:
	@if [ -x $(BUF) ] && [ "$$($(BUF) --version 2>/dev/null)" = "$(BUF_VERSION)" ]; then \
		exit 0; \
	elif ! command -v npm >/dev/null 2>&1; then \
		echo "buf: npm not found, the buf lint/breaking checks will be skipped (install Node.js and npm)"; \
	elif ! npm install --prefix .tools --no-audit --no-fund --loglevel=error \
			--fetch-retries=1 --fetch-timeout=30000 @bufbuild/buf@$(BUF_VERSION); then \
		echo "buf: npm install @bufbuild/buf@$(BUF_VERSION) failed, the buf lint/breaking checks will be skipped"; \
	fi

# Servers the tests start themselves (redis-server, prometheus/promtool); installed when missing.
system-deps:
	@bash scripts/install-system-deps.sh

# The suite on TEST_WORKERS processes (pytest-xdist; each test file stays on one worker, so its
# module fixtures are built once): run in one process it keeps about one of two cores busy (its
# CPU time ~ its wall time). TEST_WORKERS=0 runs it in this process. The 15 slowest tests and
# fixtures are listed at the end (the suite must stay under 10 minutes on 2 cores).
TEST_WORKERS ?= 2
test: install system-deps buf
	@# the compiled kernels (recsys/jit.py), once, before the workers and the services they start
	$(PY) -c "import rank_service.features, recall_service.sources, recsys.recall_merge, recsys.scenario.rules"
	RECSYS_BUF_AGAINST=$(BUF_AGAINST) $(PY) -m pytest -m "not slow and not gpu" -q --durations 15 \
		$(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile,-p no:xdist)

test-slow: install
	$(PY) -m pytest -m "slow" -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

data: install
	$(RECSYS) data prepare --data $(DATA) --artifacts $(ARTIFACTS)

eval: install
	$(RECSYS) eval --data $(DATA) --stage $(STAGE) --artifacts $(ARTIFACTS) --out $(ARTIFACTS)/eval-$(STAGE).json

# Quality over seeds: per seed, train recall and rank with defaults and evaluate what the gateway
# serves (home = the `pipeline` stage, item_detail, cart); then the README's quality section from
# the JSON (kept in artifacts/quality). E.g. make eval-seeds DATA=../shared/data/amazon-beauty
SEEDS ?= 1 2 3
eval-seeds: install
	for s in $(SEEDS); do \
	  $(RECSYS) train recall --data $(DATA) --artifacts $(ARTIFACTS)/seed$$s --seed $$s && \
	  $(RECSYS) train rank --data $(DATA) --artifacts $(ARTIFACTS)/seed$$s --seed $$s && \
	  $(RECSYS) eval --data $(DATA) --stage pipeline --scenario item_detail --scenario cart \
	    --artifacts $(ARTIFACTS)/seed$$s --out $(ARTIFACTS)/seed$$s/eval.json || exit 1; \
	done
	$(RECSYS) eval report $(foreach s,$(SEEDS),--eval $(ARTIFACTS)/seed$(s)/eval.json) --readme README.md

# Recall training speed, old vs new step interleaved (JSON).
train-bench: install
	$(PY) -m recall_service.train_bench --data $(DATA) --out $(ARTIFACTS)/bench/train-speed.json

# Seconds per recall epoch of the default recipe against the all-positions one, interleaved (JSON).
recipe-bench: install
	$(PY) -m recall_service.recipe_bench --data $(DATA) --out $(ARTIFACTS)/bench/recipe-speed.json

# Speed, as JSON + plots in $(ARTIFACTS)/bench, then the README's Performance section from them.
# BENCH_BUNDLE: the recall bundle whose real item vectors the ANN benchmark adds to the 1M
# clustered ones (the README's rows: a Beauty bundle, e.g. BENCH_BUNDLE=artifacts/beauty/recall).
BENCH_BUNDLE ?= $(ARTIFACTS)/synthetic/recall
bench: install
	$(RECSYS) bench e2e --artifacts $(ARTIFACTS) --data $(DATA) --out $(ARTIFACTS)/bench/e2e.json
	$(RECSYS) bench rank --artifacts $(ARTIFACTS) --data $(DATA) --out $(ARTIFACTS)/bench/rank.json
	$(RECSYS) bench cpu --artifacts $(ARTIFACTS) --data $(DATA) --out $(ARTIFACTS)/bench/cpu.json
	$(RECSYS) bench ann --bundle $(BENCH_BUNDLE) --out $(ARTIFACTS)/bench/ann.json
	$(RECSYS) bench report --bench $(ARTIFACTS)/bench --readme README.md

# Prepare data, train quickly, export both bundles, start recall, rank and gateway; Ctrl-C stops all.
run: install
	$(RECSYS) run --data $(DATA) --artifacts $(ARTIFACTS) --quick

# On a GPU host: GPU tests, rank/recall suites and `recsys bench gpu`, JSON + logs in artifacts/gpu-check.
gpu-check: install
	PYTHON=$(PY) bash scripts/gpu-check.sh

clean:
	rm -rf $(ARTIFACTS) recsys/v1 .tools .pytest_cache .ruff_cache build *.egg-info
