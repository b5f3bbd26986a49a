# Thin wrappers over the `distill` CLI. Every target installs the package into .venv first (once).
# Variables: MANIFEST (run spec), ARGS (extra CLI options), plus the per-target ones listed in README.md.

PYTHON      ?= python3
VENV        ?= .venv
MANIFEST    ?= manifests/demo.yaml
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

.PHONY: install test demo shards shardlist teacher teacher-cache train-student sweep stats \
        inspect-view verify-cache bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

demo: $(STAMP)
	$(DISTILL) demo --manifest $(MANIFEST) $(ARGS)

shards: $(STAMP)
	$(DISTILL) shards $(if $(SRC),--src $(SRC) --out $(OUT) --shard-size $(SHARD_SIZE),--manifest $(MANIFEST)) $(ARGS)

shardlist: $(STAMP)
	$(DISTILL) shardlist $(if $(OUT),--out $(OUT)) $(ARGS) $(SHARDS)

teacher: $(STAMP)
	$(DISTILL) teacher --manifest $(MANIFEST) $(ARGS)

teacher-cache: $(STAMP)
	$(DISTILL) teacher-cache --manifest $(MANIFEST) $(ARGS)

train-student: $(STAMP)
	$(DISTILL) train-student --manifest $(MANIFEST) $(ARGS)

sweep: $(STAMP)
	$(DISTILL) sweep --manifest $(MANIFEST) --sweep $(SWEEP) --jobs $(JOBS) $(ARGS)

stats: $(STAMP)
	$(DISTILL) stats $(if $(CACHE),--cache $(CACHE),--manifest $(MANIFEST)) $(foreach r,$(RUNS),--run $(r)) $(ARGS)

inspect-view: $(STAMP)
	$(DISTILL) inspect-view $(if $(CACHE),--cache $(CACHE),--manifest $(MANIFEST)) --epoch $(EPOCH) --shard $(SHARD) --pos $(POS) $(ARGS)

verify-cache: $(STAMP)
	$(DISTILL) verify-cache $(if $(CACHE),--cache $(CACHE)) --manifest $(MANIFEST) --sample $(SAMPLE) $(ARGS)

bench: $(STAMP)
	$(DISTILL) bench $(ARGS)

# GPU numbers (benchmarks/bench_gpu.py): needs no install, only torch/timm/numpy/Pillow/zarr/webdataset importable
# by the venv's python (or $(PYTHON) where there is no venv); skips with a message where CUDA is absent.
bench-gpu:
	PYTHONPATH=$(CURDIR) $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,$(PYTHON)) -m benchmarks.bench_gpu $(ARGS)

clean:
	rm -rf data caches runs bench
