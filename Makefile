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

.PHONY: install fashion-mnist test demo shards shardlist teacher teacher-cache train-student sweep stats \
        inspect-view verify-cache bench clean

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
	$(DISTILL) demo --manifest $(MANIFEST) $(ARGS)

shards: $(STAMP) fashion-mnist
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

clean:
	rm -rf data caches runs bench
