# ple-adatt: every user-facing command. `make help` lists them.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TRITON_FOR_TESTS := 3.9.0
SETUP_FREE_KB := 3670016
export MLFLOW_DISABLE_TELEMETRY ?= true
export PYTHONUNBUFFERED := 1

DEFAULT_DATA := data/synthetic.parquet
DATA ?= $(DEFAULT_DATA)
DATA_CONFIG ?= configs/data/synthetic.yaml
TRAIN_CONFIG ?= configs/train/cpu_small.yaml
ROWS ?= 20000
# the train run directory: make train writes it, make report reads it (OUT=... on the command
# line). Not taken from the environment, where OUT is a common name (bench/gpu_session.sh's $$OUT)
OUT = runs/train

.PHONY: help setup test test-all lint data validate train bench roofline bench-validate adult clean clean-all report \
	components compile submit run stage images mlflow-ui compare

help:  ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; install Python 3.11 or run make PY=/path/to/python3.11"; exit 1; }
	@# a first install needs about 3.5 GB (torch, mlflow, GX, kfp): say so before pip runs out midway
	@test -x $(BIN)/python || { free=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
		if [ "$${free:-0}" -lt $(SETUP_FREE_KB) ]; then \
			echo "error: setting up $(VENV) needs about 3.5 GB free on the disk of $(CURDIR); $$((free / 1024)) MB are free"; exit 1; fi; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing ple-adatt and its pinned dependencies into $(VENV) (2-3 minutes the first time)"
	@$(BIN)/pip install -q -e '.[dev]' 2>&1 | grep -v -E '^WARNING: Location .* is ignored' || true
	@$(BIN)/python -c "import ple_adatt, torch, kfp, mlflow, great_expectations, polars" \
		|| { echo "error: the environment is incomplete; see the pip output above"; exit 1; }
	@# a CPU-only torch comes without triton: install it for the interpreter test of the fused
	@# per-task gradient kernel (3.9: older interpreters break on numpy 2.4). CUDA builds bring theirs.
	@if $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
		$(BIN)/pip install -q "triton==$(TRITON_FOR_TESTS)" 2>&1 | grep -v -E '^WARNING: Location .* is ignored' || true; \
		$(BIN)/python -c "import triton" || { echo "error: triton did not install; see the pip output above"; exit 1; }; \
	fi
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned dependencies (idempotent)

test: setup  ## run the test suite (what CI runs)
	$(BIN)/pytest -q

test-all: setup  ## run every test, including the slow ones
	PLE_ADATT_RUN_SLOW=1 $(BIN)/pytest -q

lint: setup  ## ruff over the project
	$(BIN)/ruff check .

# only the default dataset is generated on demand: a DATA=... that does not exist (a typo) is an
# error, never a freshly generated synthetic dataset that the pipeline would train and register
$(DEFAULT_DATA): | setup
	$(BIN)/ple-adatt generate --out $@ --rows $(ROWS)

ifneq ($(DATA),$(DEFAULT_DATA))
$(DATA):
	@echo "error: dataset not found: $(DATA) (only the default $(DEFAULT_DATA) is generated; make data DATA=$(DATA) generates a synthetic one there)" >&2; exit 2
endif

data: setup  ## generate the synthetic 16-task dataset at DATA (default data/synthetic.parquet, ROWS=20000) unless it exists
	@if [ -e "$(DATA)" ]; then echo "$(DATA) exists (make clean removes the default one)"; \
	else $(BIN)/ple-adatt generate --out $(DATA) --rows $(ROWS); fi

train: setup $(DATA)  ## train both phases on the CPU config (TRAIN_CONFIG=..., OUT=runs/train)
	$(BIN)/ple-adatt train --data $(DATA) --data-config $(DATA_CONFIG) --config $(TRAIN_CONFIG) --out $(OUT)

clean:  ## remove generated data (synthetic, Adult), runs, build/ and caches (keeps .venv, the MLflow store, data/bench)
	rm -rf data/synthetic.parquet data/adult.parquet runs build .pytest_cache .ruff_cache

clean-all: clean  ## also remove the local MLflow store (mlflow.db, mlartifacts/) and the 2.4 GB bench data (data/bench)
	rm -rf mlflow.db mlartifacts mlruns data/bench

VALIDATE_OUT ?= runs/validate
ADULT_SRC ?= $(or $(PLE_ADATT_ADULT_PATH),../shared/data/adult/adult.data)

validate: setup $(DATA)  ## check per-task target availability of DATA against DATA_CONFIG (VALIDATE_OUT=runs/validate)
	$(BIN)/ple-adatt validate --data $(DATA) --config $(DATA_CONFIG) --out $(VALIDATE_OUT)

BENCH_ARGS ?=
bench: setup  ## Phase 1 throughput: naive reference vs this model, adaTT off / interval 10 / 1 (BENCH_ARGS="--shape seed --device cuda --grads")
	$(BIN)/python bench/train_throughput.py $(BENCH_ARGS)

ROOFLINE_ARGS ?= --shape seed
roofline: setup  ## per-op FLOPs, bytes and H100 time estimate of a training step, recorded on the CPU (ROOFLINE_ARGS="--shape seed --top 25")
	$(BIN)/python bench/roofline.py $(ROOFLINE_ARGS)

bench-validate: setup  ## time the validate stage on 10M rows x 16 targets x 40 features (cached in data/bench/)
	$(BIN)/python bench/bench_validate.py --rows 10000000

adult: setup  ## convert UCI Adult (ADULT_SRC=...) to data/adult.parquet and validate it into runs/validate-adult
	$(BIN)/ple-adatt convert-adult --src $(ADULT_SRC) --out data/adult.parquet --force
	$(BIN)/ple-adatt validate --data data/adult.parquet --config configs/data/adult.yaml --out runs/validate-adult

# ---- the pipeline: components, compile, submit, local run, stage rerun, images ----------
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' src/ple_adatt/__init__.py)
# REGISTRY=... on the command line, else $PLE_ADATT_REGISTRY, else ghcr.io/ple-adatt (compile, submit, run, images)
REGISTRY ?= $(or $(PLE_ADATT_REGISTRY),ghcr.io/ple-adatt)
PIPELINE ?= build/ple-adatt-pipeline.yaml
COMPILE_FLAGS ?=
KFP_EXPERIMENT ?= ple-adatt
SET ?=
PARAMS ?=
STAGE ?=
RUN ?=

components: setup  ## regenerate the committed component YAMLs (components/*/component.yaml)
	$(BIN)/python -m components.build

compile: setup  ## write the pipeline IR for Kubeflow (REGISTRY=..., PIPELINE=build/ple-adatt-pipeline.yaml, COMPILE_FLAGS=--no-gpu ...)
	$(BIN)/python -m pipelines.compile --out $(PIPELINE) --registry $(REGISTRY) $(COMPILE_FLAGS)

submit: compile  ## upload a pipeline version and start a run (KFP_HOST KFP_NAMESPACE KFP_TOKEN DATA_URI KFP_EXPERIMENT RUN_NAME PARAMS SET ALLOW_LOCAL_MLFLOW=1)
	$(BIN)/python -m pipelines.submit --package $(PIPELINE) --experiment $(KFP_EXPERIMENT) \
		$(if $(KFP_HOST),--host $(KFP_HOST)) $(if $(KFP_NAMESPACE),--namespace $(KFP_NAMESPACE)) \
		$(if $(DATA_URI),--data-uri $(DATA_URI)) $(if $(RUN_NAME),--run-name $(RUN_NAME)) \
		$(foreach p,$(PARAMS),--param $(p)) $(foreach s,$(SET),--set $(s)) $(if $(ALLOW_LOCAL_MLFLOW),--allow-local-mlflow)

LOCAL_PIPELINE ?= build/local/ple-adatt-pipeline.yaml
run: setup $(DATA)  ## run the pipeline locally (kfp.local, CPU config), register into ./mlflow.db, print a summary (SET=, VERBOSE=1)
	@# compiled into its own file: `make compile REGISTRY=...` output stays as it was
	$(BIN)/python -m pipelines.compile --out $(LOCAL_PIPELINE) --registry $(REGISTRY) $(COMPILE_FLAGS)
	$(BIN)/python -m pipelines.local --package $(LOCAL_PIPELINE) --data $(DATA) --data-config $(DATA_CONFIG) \
		--train-config $(TRAIN_CONFIG) $(foreach s,$(SET),--set $(s)) $(if $(VERBOSE),--verbose)

# forwarded to a stage rerun only when given (command line or environment): the run's own dataset and configs
# are the defaults there, not this Makefile's
_given = $(filter-out file default undefined,$(origin $(1)))
stage: setup  ## rerun one stage of a local run into a new directory (STAGE=train-phase2 RUN=runs/local/<run> SET='key=value ...' DATA= DATA_CONFIG= TRAIN_CONFIG= MLFLOW_TRACKING_URI=; PLE_ADATT_NO_TRACKING=1 skips MLflow)
	@test -n "$(STAGE)" || { echo "error: STAGE is required: make stage STAGE=validate|train-phase1|train-phase2|report|register [RUN=runs/local/<run>] [SET='key=value ...']"; exit 2; }
	$(BIN)/python -m pipelines.stage $(STAGE) $(if $(RUN),--run $(RUN)) $(foreach s,$(SET),--set $(s)) \
		$(if $(call _given,DATA),--data $(DATA)) $(if $(call _given,DATA_CONFIG),--data-config $(DATA_CONFIG)) \
		$(if $(call _given,TRAIN_CONFIG),--train-config $(TRAIN_CONFIG))

# the commit baked into the images (their git_commit lineage tag): HEAD, "-dirty" when tracked files differ from it
images: GIT_COMMIT = $(shell git rev-parse HEAD 2>/dev/null)$(if $(shell git --no-optional-locks status --porcelain --untracked-files=no 2>/dev/null),-dirty)
images:  ## build the CPU and CUDA images <REGISTRY>/ple-adatt-{cpu,cuda}:<version> (needs Docker; PUSH=1 pushes)
	@command -v docker >/dev/null || { echo "error: docker not found; make images needs a Docker engine (BuildKit)"; exit 2; }
	@docker info >/dev/null 2>&1 || { echo "error: no Docker engine answers (docker info failed); start dockerd or set DOCKER_HOST"; exit 2; }
	@docker buildx version >/dev/null 2>&1 || { echo "error: docker buildx is missing; the Dockerfiles need BuildKit (install the buildx plugin)"; exit 2; }
	DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile.cpu --build-arg VERSION=$(VERSION) --build-arg GIT_COMMIT=$(GIT_COMMIT) -t $(REGISTRY)/ple-adatt-cpu:$(VERSION) .
	DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile.cuda --build-arg VERSION=$(VERSION) --build-arg GIT_COMMIT=$(GIT_COMMIT) -t $(REGISTRY)/ple-adatt-cuda:$(VERSION) .
	$(if $(PUSH),docker push $(REGISTRY)/ple-adatt-cpu:$(VERSION) && docker push $(REGISTRY)/ple-adatt-cuda:$(VERSION))

REPORT_OUT ?= runs/report
report: setup  ## affinity / negative-transfer report of the train run OUT (runs/train) and VALIDATE_OUT into REPORT_OUT (runs/report)
	$(BIN)/ple-adatt report --phase1 $(OUT)/phase1 --phase2 $(OUT)/phase2 --validation $(VALIDATE_OUT) \
		--out $(REPORT_OUT)

MLFLOW_PORT ?= 5000
mlflow-ui: setup  ## open the MLflow UI on the local store ./mlflow.db (artifacts ./mlartifacts) at http://127.0.0.1:5000 (MLFLOW_PORT=)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

COMPARE_CONFIG ?= $(TRAIN_CONFIG)
COMPARE_OUT ?= runs/compare
STRATEGIES ?= adatt,pcgrad,mocograd,gradnorm,mgda,uncertainty,equal
compare: setup $(DATA)  ## train STRATEGIES + single-task baselines on DATA (COMPARE_CONFIG, TASKS=a,b, SEEDS=3 or 0,1,2); report in COMPARE_OUT
	$(BIN)/ple-adatt compare --data $(DATA) --data-config $(DATA_CONFIG) --config $(COMPARE_CONFIG) \
		--strategies $(STRATEGIES) --out $(COMPARE_OUT) $(if $(TASKS),--tasks $(TASKS)) $(if $(SEEDS),--seeds $(SEEDS)) \
		$(foreach s,$(SET),--set $(s))
