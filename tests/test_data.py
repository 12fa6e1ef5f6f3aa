import json
import logging
import os

import numpy as np
import pytest
from pycocotools import mask as mask_util

from convmae_det.data import SHAPE_CLASSES, ShapesSpec, build_lsj_augmentations, generate_shapes_dataset
from convmae_det.data.shapes import shapes_dataset_ready
from convmae_det.engine.trainer import check_image_files

SPEC = ShapesSpec(num_train=12, num_val=6, image_size=96, max_size=48, seed=3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes_dataset(str(tmp_path_factory.mktemp("d") / "shapes"), SPEC)


def test_dataset_is_coco_and_deterministic(shapes, tmp_path):
    data = json.load(open(shapes["train"]))
    assert [c["name"] for c in data["categories"]] == SHAPE_CLASSES
    assert len(data["images"]) == 12 and len(data["annotations"]) >= 12 * SPEC["min_objects"] - 4
    again = generate_shapes_dataset(str(tmp_path / "again"), SPEC)
    assert json.load(open(again["train"])) == data
    a = open(os.path.join(shapes["root"], "train", "000003.png"), "rb").read()
    b = open(os.path.join(again["root"], "train", "000003.png"), "rb").read()
    assert a == b


def test_annotations_are_visible_parts(shapes):
    data = json.load(open(shapes["val"]))
    size = SPEC["image_size"]
    by_image = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= size + 1e-6 and y + h <= size + 1e-6
        rle = mask_util.merge(mask_util.frPyObjects(a["segmentation"], size, size))
        by_image.setdefault(a["image_id"], []).append(mask_util.decode(rle).astype(bool))
    # visible parts of different instances barely overlap (only along shared polygon edges)
    for masks in by_image.values():
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                inter = (masks[i] & masks[j]).sum()
                assert inter <= 0.2 * min(masks[i].sum(), masks[j].sum()) + 8


def test_ready_check_and_regeneration(shapes):
    assert shapes_dataset_ready(shapes["root"], SPEC)
    assert not shapes_dataset_ready(shapes["root"], ShapesSpec(num_train=13, num_val=6, image_size=96, max_size=48, seed=3))


def test_builtin_dataset_root_is_read_when_the_dataset_is_used(tmp_path, monkeypatch, caplog):
    """DETECTRON2_DATASETS set after `import convmae_det` (which registered the dataset): the
    catalog and the metadata COCOEvaluator reads follow it, and the files are written there."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import convmae_det  # noqa: F401  (registers convmae_shapes_*)
    from convmae_det.data import prepare_builtin_datasets

    assert "convmae_shapes_val" in DatasetCatalog.list()
    for folder in ("a", "b"):
        monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / folder))
        root = str(tmp_path / folder / "convmae_shapes")
        if folder == "a":  # found where it is
            generate_shapes_dataset(root, SPEC)
        else:  # written there, the start and the end logged with the path
            logger = logging.getLogger("convmae_det.data")
            logger.addHandler(caplog.handler)  # whether or not a tool's set-up stopped propagation
            try:
                with caplog.at_level(logging.INFO, logger="convmae_det.data"):
                    prepare_builtin_datasets(["convmae_shapes_val"], SPEC)
            finally:
                logger.removeHandler(caplog.handler)
            assert f"writing the shapes dataset (12 train, 6 val images of 96 px) to {root}" in caplog.text
            assert f"wrote the shapes dataset to {root}" in caplog.text
        dicts = DatasetCatalog.get("convmae_shapes_val")
        assert len(dicts) == SPEC["num_val"] and all(d["file_name"].startswith(root + os.sep) for d in dicts)
        meta = MetadataCatalog.get("convmae_shapes_val")
        assert meta.json_file == os.path.join(root, "annotations", "instances_val.json")
        assert meta.image_root == os.path.join(root, "val") and meta.thing_classes == SHAPE_CLASSES


def test_missing_images_are_reported_by_path(tmp_path):
    dicts = [{"file_name": str(tmp_path / "gone.png")}]
    with pytest.raises(FileNotFoundError, match="gone.png"):
        check_image_files(dicts, ["mine"])


def test_lsj_output_fits_the_crop_and_is_padded_only_when_asked():
    import detectron2.data.transforms as T

    np.random.seed(0)
    img = np.random.randint(0, 255, (100, 140, 3), dtype=np.uint8)
    shapes = set()
    for _ in range(20):
        inp = T.AugInput(img)
        T.AugmentationList(build_lsj_augmentations(128, 0.5, 1.5))(inp)  # official: pad=False
        assert inp.image.shape[0] <= 128 and inp.image.shape[1] <= 128
        shapes.add(inp.image.shape[:2])
        padded = T.AugInput(img)
        T.AugmentationList(build_lsj_augmentations(128, 0.5, 1.5, pad=True))(padded)
        assert padded.image.shape[:2] == (128, 128)
    assert any(h < 128 for h, w in shapes) and (128, 128) in shapes  # small scales stay small
    with pytest.raises(ValueError, match="MIN_SCALE"):
        build_lsj_augmentations(128, 2.0, 1.0)
