# Thin wrappers over the `distill` CLI. Every target installs the package into .venv first (once), and builds
# what it needs first: shards -> teacher -> teacher-cache -> train-student / sweep / stats / inspect-view /
# verify-cache. Each prerequisite step is the CLI's idempotent command (done work is skipped), so any target
# works straight after clone. Variables: MANIFEST (run spec), SET (manifest overrides "key=value ...", for the
# target and its prerequisites), ARGS (extra options of the target's command only), the per-target ones in README.md.

PYTHON      ?= python3
VENV        ?= .venv
MANIFEST    ?= manifests/demo.yaml
SET         ?=
ARGS        ?=
SRC         ?=
OUT         ?=
SHARD_SIZE  ?= 1000
SHARDS      ?=
SWEEP       ?= manifests/sweeps/demo.yaml
JOBS        ?= 1
CACHE       ?=
RUNS        ?=
EPOCH       ?= 0
SHARD       ?= 0
POS         ?= 0
SAMPLE      ?= 0.01

DISTILL := $(VENV)/bin/distill
STAMP   := $(VENV)/.installed
SPEC    := --manifest $(MANIFEST) $(foreach s,$(SET),--set $(s))

.PHONY: install fashion-mnist test demo shards shardlist teacher plan teacher-cache train-student sweep stats \
        inspect-view verify-cache bench bench-gpu real-smoke clean have-shards have-teacher have-cache

install: $(STAMP) fashion-mnist

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# The demo's data (Fashion-MNIST, no download at run time): Debian's package where apt and root are at hand;
# elsewhere point FASHION_MNIST_DIR at the four standard IDX files. Never fails: `distill demo` says what is missing.
FASHION_MNIST_FILE := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

fashion-mnist:
	@if [ -n "$$FASHION_MNIST_DIR" ] || [ -f $(FASHION_MNIST_FILE) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's dataset-fashion-mnist (Fashion-MNIST, 30 MB, into /usr/share/datasets/fashion-mnist)"; \
	  apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; } \
	    || echo "could not install dataset-fashion-mnist: set FASHION_MNIST_DIR to the four Fashion-MNIST IDX files"; \
	else echo "Fashion-MNIST (the demo's data) is not installed: 'sudo apt-get install dataset-fashion-mnist', or set" \
	  "FASHION_MNIST_DIR to a directory holding the four IDX files (train-images-idx3-ubyte.gz ...)"; fi

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

demo: $(STAMP) fashion-mnist
	$(DISTILL) demo $(SPEC) $(ARGS)

shards: $(STAMP) fashion-mnist
	$(DISTILL) shards $(if $(SRC),--src $(SRC) --out $(OUT) --shard-size $(SHARD_SIZE),$(SPEC)) $(ARGS)

shardlist: $(STAMP)
	$(DISTILL) shardlist $(if $(OUT),--out $(OUT)) $(ARGS) $(SHARDS)

teacher: have-shards
	$(DISTILL) teacher $(SPEC) $(ARGS)

plan: have-shards
	$(DISTILL) plan $(SPEC) $(ARGS)

teacher-cache: have-teacher
	$(DISTILL) teacher-cache $(SPEC) $(ARGS)

train-student: have-cache
	$(DISTILL) train-student $(SPEC) $(ARGS)

sweep: have-cache
	$(DISTILL) sweep $(SPEC) --sweep $(SWEEP) --jobs $(JOBS) $(ARGS)

stats: $(if $(CACHE),$(STAMP),have-cache)
	$(DISTILL) stats $(if $(CACHE),--cache $(CACHE),$(SPEC)) $(foreach r,$(RUNS),--run $(r)) $(ARGS)

inspect-view: $(if $(CACHE),have-shards,have-cache)
	$(DISTILL) inspect-view $(if $(CACHE),--cache $(CACHE)) $(SPEC) --epoch $(EPOCH) --shard $(SHARD) --pos $(POS) $(ARGS)

verify-cache: $(if $(CACHE),have-teacher,have-cache)
	$(DISTILL) verify-cache $(if $(CACHE),--cache $(CACHE)) $(SPEC) --sample $(SAMPLE) $(ARGS)

bench: $(STAMP)
	$(DISTILL) bench $(ARGS)

real-smoke: $(STAMP)
	$(DISTILL) real-smoke $(ARGS)

# GPU numbers (benchmarks/bench_gpu.py): needs no install, only torch/timm/numpy/Pillow/simplejpeg/zarr/webdataset importable
# by the venv's python (or $(PYTHON) where there is no venv); skips with a message where CUDA is absent.
bench-gpu:
	PYTHONPATH=$(CURDIR) $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,$(PYTHON)) -m benchmarks.bench_gpu $(ARGS)

clean:
	rm -rf data caches runs bench

# Prerequisite steps (no ARGS: those belong to the target asked for). Each skips what is already there.
have-shards: $(STAMP) fashion-mnist
	$(DISTILL) shards $(SPEC) --if-missing

have-teacher: have-shards
	$(DISTILL) teacher $(SPEC)

have-cache: have-teacher
	$(DISTILL) teacher-cache $(SPEC)
