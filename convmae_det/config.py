"""Every convmae-det default, in one place: ``add_convmae_config(cfg)``.

Besides its own keys it makes detectron2's model defaults those of a ViTDet-style ConvMAE
Mask R-CNN (``configs/Base-ConvMAE-MaskRCNN.yaml`` less its COCO sizes and recipe): the
backbone, the pyramid levels the heads read, anchors per level, the heads and RGB ImageNet
normalisation. So ``add_convmae_config(get_cfg())`` builds a ConvMAE model of every
MODEL.CONVMAE.SIZE; a config written against detectron2's ResNet defaults must name them.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_convmae_config"]


def add_convmae_config(cfg: CN) -> CN:
    """Add convmae-det's keys to a detectron2 config (in place) and return it."""
    _C = cfg
    _C.MODEL.CONVMAE = CN()
    # named size: tiny, small, base or large (convmae_det.modeling.convvit.CONVVIT_SIZES)
    _C.MODEL.CONVMAE.SIZE = "base"
    # per-stage overrides of the named size; empty keeps the size's value
    _C.MODEL.CONVMAE.EMBED_DIMS = []
    _C.MODEL.CONVMAE.DEPTHS = []
    _C.MODEL.CONVMAE.NUM_HEADS = 0
    _C.MODEL.CONVMAE.MLP_RATIO = 4.0
    # image size the absolute position embedding was pretrained at (224 -> 14x14 positions)
    _C.MODEL.CONVMAE.PRETRAIN_IMG_SIZE = 224
    _C.MODEL.CONVMAE.DROP_PATH_RATE = 0.1
    # eps of the conv blocks' LayerNorms: 1e-6 (official detection code), 1e-5 (pretraining)
    _C.MODEL.CONVMAE.CONV_NORM_EPS = 1e-6
    _C.MODEL.CONVMAE.WINDOW_SIZE = 14
    # stage-3 blocks with global attention; all others use windows of WINDOW_SIZE. Empty: the
    # size's own (convmae_det.modeling.convvit.GLOBAL_ATTN_INDEXES; base: 1, 4, 7, 10)
    _C.MODEL.CONVMAE.GLOBAL_ATTN_INDEXES = []
    _C.MODEL.CONVMAE.USE_REL_POS = True
    # training image size: global blocks' rel-pos tables are sized for a (size/16) grid
    _C.MODEL.CONVMAE.REL_POS_IMG_SIZE = 1024
    # recompute block activations in backward (on the CPU keeping the attention kernels' outputs)
    _C.MODEL.CONVMAE.USE_ACT_CHECKPOINT = False
    # torch.compile each encoder block (GPU training speed; the first step of each input shape
    # pays the compilation). Ignored on the CPU, where compiling costs minutes and gains little
    _C.MODEL.CONVMAE.COMPILE = False
    # "fast" (fused attention, channels-last conv stages) or "eager" (explicit attention
    # matrices, NCHW conv stages: what the official code computes); same weights, same outputs
    _C.MODEL.CONVMAE.IMPL = "fast"
    # zero-pad every input to a SQUARE_PAD x SQUARE_PAD square (ViTDet pads to 1024); 0 = off
    _C.MODEL.CONVMAE.SQUARE_PAD = 1024
    _C.MODEL.CONVMAE.PYRAMID = CN()
    _C.MODEL.CONVMAE.PYRAMID.OUT_CHANNELS = 256
    # simple feature pyramid only: scales applied to the stride-16 output
    _C.MODEL.CONVMAE.PYRAMID.SCALE_FACTORS = [4.0, 2.0, 1.0, 0.5]
    # multi-scale pyramid only: encoder outputs that become p2..p5 (a contiguous run of
    # s4, s8, s16, s32); p6 is a max pool of the last
    _C.MODEL.CONVMAE.PYRAMID.MSFP_IN_FEATURES = ["s4", "s8", "s16", "s32"]
    # normalise the encoder outputs the pyramid reads: "" (official) or "BN" (BatchNorm without
    # affine parameters, as MAE's linear probe; removes a pretrained encoder's per-channel offsets)
    _C.MODEL.CONVMAE.PYRAMID.FEATURE_NORM = ""

    # ConvMAEROIHeads: box size that maps to the canonical level p4 (detectron2 fixes 224)
    _C.MODEL.ROI_HEADS.CANONICAL_BOX_SIZE = 224

    # detectron2's model keys, for a ConvMAE Mask R-CNN (detectron2's defaults are a ResNet C4
    # model, whose heads read "res4"): p2-p6 from the pyramid, one anchor size per level
    _C.MODEL.MASK_ON = True
    _C.MODEL.BACKBONE.NAME = "build_convmae_sfp_backbone"
    _C.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]  # RGB, ImageNet statistics as in pretraining
    _C.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    _C.INPUT.FORMAT = "RGB"
    _C.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    _C.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    _C.MODEL.RPN.CONV_DIMS = [-1, -1]  # ViTDet: two 3x3 convs
    _C.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    _C.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    _C.MODEL.ROI_BOX_HEAD.NAME = "ConvMAEConvFCHead"  # 4 conv + 1 fc with LayerNorm
    _C.MODEL.ROI_BOX_HEAD.NUM_CONV = 4
    _C.MODEL.ROI_BOX_HEAD.CONV_DIM = 256
    _C.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    _C.MODEL.ROI_BOX_HEAD.FC_DIM = 1024
    _C.MODEL.ROI_BOX_HEAD.NORM = "LN"
    _C.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    _C.MODEL.ROI_MASK_HEAD.NAME = "ConvMAEMaskHead"
    _C.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
    _C.MODEL.ROI_MASK_HEAD.CONV_DIM = 256
    _C.MODEL.ROI_MASK_HEAD.NORM = "LN"

    # Heads: "LN" (channel LayerNorm, as in ViTDet) is accepted by the ConvMAE* heads' NORM keys
    # on every detectron2 release, including 0.6, which has no get_norm("LN").

    _C.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" or "SGD"
    # periodic checkpoints to keep, the newest (0: all); model_final.pth is always kept
    _C.SOLVER.CHECKPOINT_MAX_TO_KEEP = 0
    # fused optimizer kernels (torch.optim fused=True) when the model is on CUDA and
    # SOLVER.CLIP_GRADIENTS is off; same update, fewer kernel launches
    _C.SOLVER.FUSED = True
    _C.SOLVER.BETAS = (0.9, 0.999)
    # layer-wise lr decay, the official ConvMAE-Det rule (get_vit_lr_decay_rate): stage-3 block i
    # gets LR * DECAY ** (depth - i), the patch embeddings and stages 1-2 DECAY ** (depth + 1),
    # everything else LR, the position embedding included (ViTDet's ViT rule decays pos_embed
    # like the patch embedding; ConvMAE-Det's does not); 1.0 disables it
    _C.SOLVER.LAYER_DECAY = 1.0
    # weight decay of position embeddings (ViTDet and ConvMAE-Det: 0)
    _C.SOLVER.WEIGHT_DECAY_POS_EMBED = 0.0
    # False (official recipe): WEIGHT_DECAY_NORM applies to torch.nn norm types only, so the
    # pyramid's and heads' channel LayerNorms (detectron2's LayerNorm officially) are decayed by
    # WEIGHT_DECAY like weights. True: they get WEIGHT_DECAY_NORM as well (a deliberate
    # alternative, no decay on any norm; not the recipe behind the published results)
    _C.SOLVER.WEIGHT_DECAY_NORM_ALL_LN = False
    # SOLVER.LR_SCHEDULER_NAME "WarmupPolyLR" (semantic segmentation): lr x (1 - iter/MAX_ITER)
    # ** POLY_LR_POWER after the warm-up (the key name of detectron2's DeepLab project)
    _C.SOLVER.POLY_LR_POWER = 0.9

    # Large-scale jitter (ViTDet's COCO recipe): flip, ResizeScale, FixedSizeCrop
    _C.INPUT.LSJ = CN()
    _C.INPUT.LSJ.ENABLED = False
    _C.INPUT.LSJ.IMAGE_SIZE = 1024
    _C.INPUT.LSJ.MIN_SCALE = 0.1
    _C.INPUT.LSJ.MAX_SCALE = 2.0
    # False (official recipe: FixedSizeCrop(pad=False)): an image smaller than the crop stays
    # small, the model zero-pads it to MODEL.CONVMAE.SQUARE_PAD and its image_sizes stay real.
    # True: the mapper pads it to IMAGE_SIZE with PAD_VALUE, and the border counts as image
    _C.INPUT.LSJ.PAD = False
    _C.INPUT.LSJ.PAD_VALUE = 128.0

    # Semantic segmentation training (SemanticSegmentor, convmae_det.data.build_sem_seg_augmentations):
    # INPUT.CROP crops after the resize; a crop is redrawn (up to 10 times) while one class
    # covers more than this fraction of it (mmseg's cat_max_ratio; 1.0: any crop; the key name of
    # detectron2's DeepLab project)
    _C.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # brightness, contrast and saturation jitter (an approximation of mmseg's PhotoMetricDistortion)
    _C.INPUT.COLOR_AUG = False

    # COCOeval of the COCOEvaluator: "auto" = detectron2's compiled one if this detectron2 has
    # it, else faster-coco-eval (same stats as pycocotools), else pycocotools; "true" = the same
    # but an error if neither fast one is there; "false"/"pycocotools"; "compiled";
    # "faster_coco_eval" (see convmae_det/evaluation.py)
    _C.TEST.FAST_COCO_EVAL = "auto"
    # number of val images drawn with predictions after evaluation (0 = none)
    _C.TEST.VIS_NUM_IMAGES = 0
    _C.TEST.VIS_SCORE_THRESH = 0.5
    return cfg
