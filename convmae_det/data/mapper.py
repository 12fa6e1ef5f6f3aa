"""Training/test dataset mappers, including ViTDet's large-scale jitter (LSJ)."""
import detectron2.data.transforms as T
from detectron2.data import DatasetMapper

__all__ = ["build_lsj_augmentations", "build_train_mapper"]


def build_lsj_augmentations(
    image_size: int, min_scale: float, max_scale: float, pad: bool = False, pad_value: float = 128.0
):
    """Flip, ResizeScale(min, max) of a square target, FixedSizeCrop to image_size (ViTDet COCO).

    With ``pad=False`` (the official recipe) the crop only cuts images larger than
    ``image_size``; smaller ones stay as they are and the model pads them."""
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"INPUT.LSJ scales must satisfy 0 < MIN_SCALE <= MAX_SCALE, got {min_scale}, {max_scale}")
    return [
        T.RandomFlip(horizontal=True),
        T.ResizeScale(min_scale=min_scale, max_scale=max_scale, target_height=image_size, target_width=image_size),
        T.FixedSizeCrop(crop_size=(image_size, image_size), pad=pad, pad_value=pad_value),
    ]


def build_train_mapper(cfg):
    """DatasetMapper for training: LSJ when INPUT.LSJ.ENABLED, detectron2's default otherwise."""
    if not cfg.INPUT.LSJ.ENABLED:
        return DatasetMapper(cfg, is_train=True)
    lsj = cfg.INPUT.LSJ
    return DatasetMapper(
        is_train=True,
        augmentations=build_lsj_augmentations(lsj.IMAGE_SIZE, lsj.MIN_SCALE, lsj.MAX_SCALE, lsj.PAD, lsj.PAD_VALUE),
        image_format=cfg.INPUT.FORMAT,
        use_instance_mask=cfg.MODEL.MASK_ON,
        instance_mask_format=cfg.INPUT.MASK_FORMAT,
        use_keypoint=cfg.MODEL.KEYPOINT_ON,
        recompute_boxes=cfg.MODEL.MASK_ON,  # boxes of cropped instances follow their masks
    )
