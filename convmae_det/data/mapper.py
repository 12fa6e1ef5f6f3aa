"""Training/test dataset mappers, including ViTDet's large-scale jitter (LSJ) and the
semantic segmentation recipe (resize, crop, colour jitter, flip)."""
import detectron2.data.transforms as T
from detectron2.data import DatasetMapper

__all__ = ["build_lsj_augmentations", "build_sem_seg_augmentations", "build_train_mapper", "is_sem_seg"]


def is_sem_seg(cfg) -> bool:
    """True when the config trains detectron2's SemanticSegmentor."""
    return cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"


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


def build_sem_seg_augmentations(cfg):
    """Training augmentations of a semantic segmentation config, in mmsegmentation's order
    (the ConvMAE/BEiT ADE20K pipeline): ResizeShortestEdge (INPUT.MIN_SIZE_TRAIN, MAX_SIZE_TRAIN,
    MIN_SIZE_TRAIN_SAMPLING), then, with INPUT.CROP.ENABLED, a crop of INPUT.CROP.SIZE in which
    no class covers more than INPUT.CROP.SINGLE_CATEGORY_MAX_AREA (mmseg's ``cat_max_ratio``),
    then with INPUT.COLOR_AUG brightness, contrast and saturation jitter, each applied with
    probability 0.5, then INPUT.RANDOM_FLIP.

    detectron2's own DatasetMapper crops *before* resizing, which for this recipe would cut
    512 px out of the original image instead of the rescaled one."""
    inp = cfg.INPUT
    augs = [T.ResizeShortestEdge(inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING)]
    if inp.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                inp.CROP.TYPE, inp.CROP.SIZE, inp.CROP.SINGLE_CATEGORY_MAX_AREA, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
            )
        )
    if inp.COLOR_AUG:
        # mmseg's PhotoMetricDistortion adds a brightness delta of up to 32 and jitters the hue
        # as well; detectron2 scales brightness (0.75-1.25 ~ +-32 around mid-grey) and has no hue
        augs += [
            T.RandomApply(T.RandomBrightness(0.75, 1.25), 0.5),
            T.RandomApply(T.RandomContrast(0.5, 1.5), 0.5),
            T.RandomApply(T.RandomSaturation(0.5, 1.5), 0.5),
        ]
    if inp.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=inp.RANDOM_FLIP == "horizontal", vertical=inp.RANDOM_FLIP == "vertical"))
    return augs


def build_train_mapper(cfg):
    """DatasetMapper for training: the semantic segmentation recipe for a SemanticSegmentor,
    LSJ when INPUT.LSJ.ENABLED, detectron2's default otherwise."""
    if is_sem_seg(cfg):
        return DatasetMapper(
            is_train=True,
            augmentations=build_sem_seg_augmentations(cfg),
            image_format=cfg.INPUT.FORMAT,
            use_instance_mask=False,
        )
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
