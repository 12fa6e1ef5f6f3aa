from .builtin import (
    BUILTIN_SHAPES,
    BUILTIN_SHAPES_SEM_SEG,
    add_register_argument,
    load_shapes_sem_seg,
    prepare_builtin_datasets,
    register_builtin_shapes,
    register_coco_datasets,
    shapes_root,
)
from .checks import DatasetError, check_image_files, check_num_classes, load_coco_json_named
from .loader import ResumableTrainLoader
from .mapper import build_lsj_augmentations, build_sem_seg_augmentations, build_train_mapper
from .shapes import (
    SEM_SEG_CLASSES,
    SEM_SEG_IGNORE,
    SHAPE_CLASSES,
    ShapesSpec,
    generate_shapes_dataset,
    generate_shapes_pool,
    semantic_label_map,
    shapes_dataset_ready,
    write_labeled_subset,
    write_sem_seg_labels,
)

__all__ = [
    "BUILTIN_SHAPES",
    "BUILTIN_SHAPES_SEM_SEG",
    "DatasetError",
    "ResumableTrainLoader",
    "SEM_SEG_CLASSES",
    "SEM_SEG_IGNORE",
    "SHAPE_CLASSES",
    "ShapesSpec",
    "add_register_argument",
    "build_lsj_augmentations",
    "build_sem_seg_augmentations",
    "build_train_mapper",
    "check_image_files",
    "check_num_classes",
    "generate_shapes_dataset",
    "generate_shapes_pool",
    "load_coco_json_named",
    "load_shapes_sem_seg",
    "prepare_builtin_datasets",
    "register_builtin_shapes",
    "register_coco_datasets",
    "semantic_label_map",
    "shapes_dataset_ready",
    "shapes_root",
    "write_labeled_subset",
    "write_sem_seg_labels",
]
