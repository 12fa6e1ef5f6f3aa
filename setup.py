import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_PATTERNS = ("*.yaml", "*.yml", "*.py")  # yacs configs and LazyConfig .py configs


def config_files():
    """configs/**/{*.yaml,*.yml,*.py}, relative to configs/."""
    root = os.path.join(HERE, "configs")
    found = {os.path.relpath(p, root) for pat in CONFIG_PATTERNS for p in glob.glob(os.path.join(root, "**", pat), recursive=True)}
    return sorted(f for f in found if "__pycache__" not in f.split(os.sep))


class build_py_with_configs(build_py):
    """build_py that also copies the repository's configs/ into the package as
    convmae_det/model_zoo/configs (convmae_det.model_zoo.get_config_file reads them there), as
    detectron2's setup.py ships its configs; configs/ stays the one source, nothing is written
    into the source tree. An editable install reads configs/ itself."""

    def run(self):
        super().run()
        if not self.editable_mode:
            for rel in config_files():
                dst = os.path.join(self.build_lib, "convmae_det", "model_zoo", "configs", rel)
                self.mkpath(os.path.dirname(dst))
                self.copy_file(os.path.join(HERE, "configs", rel), dst, preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        configs = os.path.join(self.build_lib, "convmae_det", "model_zoo", "configs")
        return super().get_outputs(include_bytecode) + [os.path.join(configs, rel) for rel in config_files()]


setup(
    name="convmae-det",
    version="0.1.0",
    description="ConvMAE backbones, pretraining and checkpoint conversion for detectron2",
    packages=find_packages(include=("convmae_det", "convmae_det.*")),
    cmdclass={"build_py": build_py_with_configs},
    python_requires=">=3.9",
    # detectron2 is not on PyPI: tools/install_detectron2.py (make setup) provides it
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "fvcore",
        "timm>=1.0.12",  # timm.optim.param_groups_weight_decay
        "pycocotools>=2.0.2",
        "faster-coco-eval>=1.8",  # TEST.FAST_COCO_EVAL without detectron2's compiled ops
        "shapely",
        "numpy",
        "Pillow",
        "matplotlib",  # convmae-seed-grid's plot
        "tensorboard",  # torch.utils.tensorboard: pretraining's and detectron2's training scalars
    ],
    # tools/export_model.py --format onnx; TorchScript export needs nothing more
    extras_require={"onnx": ["onnx", "onnxruntime"]},
    # tools/X.py are wrappers of these for a clone; the code is in convmae_det/cli/
    entry_points={
        "console_scripts": [
            "convmae-train=convmae_det.cli.train_net:cli",
            "convmae-pretrain=convmae_det.cli.pretrain:main",
            "convmae-convert=convmae_det.cli.convert_pretrain:main",
            "convmae-predict=convmae_det.cli.predict:main",
            "convmae-benchmark=convmae_det.cli.benchmark:main",
            "convmae-export=convmae_det.cli.export_model:main",
            "convmae-coco-eval-bench=convmae_det.cli.coco_eval_bench:main",
            "convmae-seed-grid=convmae_det.cli.seed_grid:main",
            "convmae-make-shapes=convmae_det.cli.make_shapes_dataset:main",
            "convmae-probe=convmae_det.cli.probe:main",
        ]
    },
)
