# Two commands: `make demo` (train + evaluate on the built-in dataset) and `make test`.
# Both create or reuse a virtual environment in $(VENV) with everything installed.
#   make test VENV_FLAGS=--system-site-packages   reuse a detectron2 you built yourself
#   make test TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"   another torch
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.convmae-det-installed
DEMO_CONFIG ?= configs/Shapes/mask_rcnn_convmae_tiny_shapes.yaml
DEMO_OUT ?= output/demo

.PHONY: setup demo demo-scratch test clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -r requirements.txt
	$(PY) tools/install_detectron2.py --build-dir $(VENV)/build/detectron2
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	$(PY) -c "import convmae_det, detectron2; print('convmae-det ready with detectron2', detectron2.__version__)"
	touch $(STAMP)

demo: setup
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf output build *.egg-info
