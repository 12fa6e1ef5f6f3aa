from setuptools import find_packages, setup

setup(
    name="convmae-det",
    version="0.1.0",
    description="ConvMAE backbones, pretraining and checkpoint conversion for detectron2",
    packages=find_packages(include=("convmae_det", "convmae_det.*")),
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
    ],
    # tools/export_model.py --format onnx; TorchScript export needs nothing more
    extras_require={"onnx": ["onnx", "onnxruntime"]},
)
