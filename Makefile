# Two commands: `make demo` (pretrain on an unlabeled image pool -> convert -> finetune on a small
# labeled split -> evaluate, next to the same finetune from random initialisation) and `make test`;
# `make demo-scratch` runs (or reuses) only the random-initialisation row.
# Both create or reuse a virtual environment in $(VENV) with everything installed.
#   make test VENV_FLAGS=--system-site-packages   reuse a detectron2 you built yourself
#   make test TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"   another torch
# CI (.ci/run) also runs `make test-d2main` (the suite on upstream detectron2 main) and
# `make test-d2-v0.6` (detectron2 v0.6's own tests on the installed v0.6).
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.convmae-det-installed
SCRATCH_CONFIG ?= configs/Shapes/mask_rcnn_convmae_tiny_shapes_labeled.yaml
FINETUNE_CONFIG ?= configs/Shapes/mask_rcnn_convmae_tiny_shapes_labeled_pretrained.yaml
DEMO_OUT ?= output/demo
LABELED ?= 100
POOL ?= 6000
PRETRAIN_STEPS ?= 960
PRETRAIN_LR ?= 5e-4
SEEDS ?= 0
export DETECTRON2_DATASETS ?= datasets
# upstream detectron2 (see ../shared/vendor/README.md): main's Python sources, v0.6's tests
# ../shared/vendor beside the checkout, else beside the repository it was cloned from (a clone
# in a temporary folder of the project's checkout)
SHARED_VENDOR ?= $(firstword $(wildcard ../shared/vendor) \
	$(wildcard $(dir $(realpath $(shell git config --get remote.origin.url 2>/dev/null)))shared/vendor) ../shared/vendor)
D2_MAIN_SRC ?= $(SHARED_VENDOR)/detectron2-main
D2_V06_TESTS ?= $(SHARED_VENDOR)/detectron2-v0.6-tests/tests
D2_MAIN := $(abspath $(VENV))/detectron2-main
D2_V06_SELECT ?= tests/config tests/structures tests/modeling tests/data tests/test_checkpoint.py \
	tests/test_engine.py tests/test_solver.py tests/test_scheduler.py tests/test_export_torchscript.py tests/test_model_analysis.py

.PHONY: setup demo demo-scratch test test-d2main test-d2-v0.6 clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -r requirements.txt
	$(PY) tools/install_detectron2.py --build-dir $(VENV)/build/detectron2
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	$(PY) -c "import convmae_det, detectron2; print('convmae-det ready with detectron2', detectron2.__version__)"
	touch $(STAMP)

# pretrain a tiny ConvMAE on the unlabeled pool -> convert -> finetune Mask R-CNN on the first
# $(LABELED) labeled training images, from the pretrained weights and from random initialisation
# (a row that this command or `make demo-scratch` already ran with the same settings is read
# from its result file) -> a side-by-side table
demo: setup
	$(PY) tools/make_shapes_dataset.py --pool $(POOL) --labeled $(LABELED)
	$(PY) tools/pretrain.py --data $(DETECTRON2_DATASETS)/convmae_shapes/pool --output $(DEMO_OUT)/pretrain --overwrite \
		--size tiny --img-size 128 --decoder-dim 128 --decoder-depth 2 --decoder-heads 4 \
		--batch-size 32 --steps $(PRETRAIN_STEPS) --lr $(PRETRAIN_LR) --warmup-steps 40 --num-workers 1 \
		--checkpoint-every $(PRETRAIN_STEPS) --log-every 80
	$(PY) tools/convert_pretrain.py $(DEMO_OUT)/pretrain/checkpoint.pth $(DEMO_OUT)/pretrain/convmae_tiny_d2.pth \
		--config $(FINETUNE_CONFIG)
	$(PY) tools/seed_grid.py --out $(DEMO_OUT)/finetune --labeled $(LABELED) --seeds $(SEEDS) \
		--title "make demo: $(LABELED) labeled images" \
		--init random=$(SCRATCH_CONFIG) --init pretrained=$(FINETUNE_CONFIG):$(DEMO_OUT)/pretrain/convmae_tiny_d2.pth

# the same finetune from random initialisation only (make demo reads its result)
demo-scratch: setup
	$(PY) tools/make_shapes_dataset.py --labeled $(LABELED)
	$(PY) tools/seed_grid.py --out $(DEMO_OUT)/finetune --labeled $(LABELED) --seeds $(SEEDS) --init random=$(SCRATCH_CONFIG)

test: setup
	$(PY) -m pytest -q tests

# the suite on detectron2 main: tools/install_detectron2.py installs $(D2_MAIN_SRC) with the same
# changes, Python only, into $(D2_MAIN); PYTHONPATH puts it in front of the environment's v0.6
test-d2main: $(D2_MAIN)/.installed
	PYTHONPATH=$(D2_MAIN) $(PY) -c "import detectron2; assert detectron2.__file__.startswith('$(D2_MAIN)/'), detectron2.__file__"
	PYTHONPATH=$(D2_MAIN) $(PY) -m pytest -q tests

$(D2_MAIN)/.installed: $(STAMP) tools/install_detectron2.py
	$(PY) tools/install_detectron2.py --src $(D2_MAIN_SRC) --target $(D2_MAIN) --build-dir $(VENV)/build/detectron2-main
	touch $@

# detectron2 v0.6's own tests on the v0.6 that `make setup` installs, less the ones listed with
# their reason in tests/detectron2_v0.6_deselected.txt (everything else must pass)
test-d2-v0.6: setup
	$(PY) tools/run_detectron2_tests.py --tests $(D2_V06_TESTS) --deselect tests/detectron2_v0.6_deselected.txt \
		--workdir $(VENV)/build/detectron2-v0.6-tests -- -q --disable-warnings $(D2_V06_SELECT)

clean:
	rm -rf output build *.egg-info
