# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip takes torch from the machine's local wheel files where they exist.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast bench clean grid grid-imagenet_lt grid-places_lt grid-inat18 grid-cifar100_lt

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(VENV)/bin/ltclip demo

test: $(STAMP)
	$(PY) -m pytest

# Everything but the tests marked slow (subprocess, SIGKILL and torchrun runs).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# The paper's grid on one dataset: make grid DATASET=places_lt DATA_ROOT=/data/places365 [MODEL=ViT-B-16
# PRETRAINED=openai EPOCHS=10 MANIFEST_DIR=...]; or the named targets below with DATA_ROOT set.
grid: $(STAMP)
	LTCLIP=$(VENV)/bin/ltclip bash scripts/paper_grid.sh

grid-imagenet_lt grid-places_lt grid-inat18 grid-cifar100_lt: $(STAMP)
	LTCLIP=$(VENV)/bin/ltclip DATASET=$(@:grid-%=%) bash scripts/paper_grid.sh

clean:
	rm -rf demo bench_out .pytest_cache
