# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip takes torch from the machine's local wheel files where they exist.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast bench bench-device catalog clean reproduce reproduce-lift

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(VENV)/bin/ltclip demo

# One pytest worker per core (pytest-xdist), each test file on one worker: its module fixtures
# are built once. The tests are single-threaded (torch.set_num_threads(1) in conftest.py).
PYTEST := $(PY) -m pytest -n auto --dist loadfile

test: $(STAMP)
	$(PYTEST)

# Everything but the tests marked slow (subprocess, SIGKILL and torchrun runs).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# One prepared GPU measurement (extract, decoder, finetune, prompt, kNN) for a few minutes on a borrowed GPU:
# about 8 minutes on one H100. `--size tiny` runs it on a CPU. See docs/performance.md, "Device check".
bench-device: $(STAMP)
	$(PY) -m benchmarks.device_check --size full --out benchmarks/results/device

# ltclip/recipes/catalog.json: the registered methods as `ltclip list` shows them (read without torch);
# remake it after registering a loss, head, sampler, second stage, schedule or tuning mode.
catalog: $(STAMP)
	$(PY) -m ltclip.recipes.catalog

# The paper's table on one dataset: make reproduce DATASET=imagenet_lt|places_lt|inat18|cifar100_lt
# DATA_ROOT=/data/... [MODEL=ViT-L-14 PRETRAINED=openai OUT=experiments/... ARGS="--precision bf16 ..."];
# reproduce-lift adds LIFT's and LIFT+'s rows (their recipes, their tables' test views). Every finished step is
# skipped, so a rerun continues.
# The venv is only created when missing (order-only): a run never reinstalls. See docs/reproduction.md.
LTCLIP ?= $(VENV)/bin/ltclip
REPRODUCE = $(LTCLIP) reproduce --dataset "$(DATASET)" --data-root "$(DATA_ROOT)" --model "$(or $(MODEL),ViT-L-14)" \
	--pretrained "$(or $(PRETRAINED),openai)" $(if $(OUT),--out "$(OUT)") $(ARGS)

reproduce: | $(STAMP)
	$(REPRODUCE) --recipe imbalance-vlm

reproduce-lift: | $(STAMP)
	$(REPRODUCE) --recipe lift

clean:
	rm -rf demo bench_out .pytest_cache
