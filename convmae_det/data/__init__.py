from .builtin import (
    BUILTIN_SHAPES,
    add_register_argument,
    prepare_builtin_datasets,
    register_builtin_shapes,
    register_coco_datasets,
    shapes_root,
)
from .checks import DatasetError, check_image_files, check_num_classes, load_coco_json_named
from .loader import ResumableTrainLoader
from .mapper import build_lsj_augmentations, build_train_mapper
from .shapes import (
    SHAPE_CLASSES,
    ShapesSpec,
    generate_shapes_dataset,
    generate_shapes_pool,
    shapes_dataset_ready,
    write_labeled_subset,
)

__all__ = [
    "BUILTIN_SHAPES",
    "DatasetError",
    "ResumableTrainLoader",
    "SHAPE_CLASSES",
    "ShapesSpec",
    "add_register_argument",
    "build_lsj_augmentations",
    "build_train_mapper",
    "check_image_files",
    "check_num_classes",
    "generate_shapes_dataset",
    "generate_shapes_pool",
    "load_coco_json_named",
    "prepare_builtin_datasets",
    "register_builtin_shapes",
    "register_coco_datasets",
    "shapes_dataset_ready",
    "shapes_root",
    "write_labeled_subset",
]
