# The LazyConfig twin of configs/Base-ConvMAE-MaskRCNN.yaml: ViTDet-style Mask R-CNN around a
# ConvMAE backbone, sized for COCO at 1024, built from detectron2's classes and convmae_det's
# modules. Every value is the one the yacs config (with detectron2's defaults) gives; the
# COCO and Shapes configs import these five objects and change what their yaml files change.
# tests/test_lazy_config.py builds both and compares parameters, settings and outputs.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import (
    FastRCNNConvFCHead,
    FastRCNNOutputLayers,
    MaskRCNNConvUpsampleHead,
    StandardROIHeads,
)
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from torch.optim import AdamW

from convmae_det.data import build_lsj_augmentations
from convmae_det.evaluation import COCOEvaluator, resolve_coco_eval_backend
from convmae_det.modeling import ConvViT, SimpleFeaturePyramid, convvit_kwargs, resolve_norm
from convmae_det.modeling.pyramid import last_level_max_pool
from convmae_det.solver import get_param_groups

# "LN": the channel LayerNorm (eps 1e-6) that the yacs heads' NORM: "LN" resolves to; detectron2
# v0.6's get_norm has no "LN", so the heads get the factory itself
LN = resolve_norm("LN")

model = L(GeneralizedRCNN)(
    backbone=L(SimpleFeaturePyramid)(  # MODEL.BACKBONE.NAME build_convmae_sfp_backbone
        net=L(ConvViT)(
            **convvit_kwargs("base"),  # MODEL.CONVMAE.SIZE
            mlp_ratio=4.0,
            pretrain_img_size=224,
            drop_path_rate=0.1,
            conv_norm_eps=1e-6,
            window_size=14,
            # stage-3 blocks with window attention: all but GLOBAL_ATTN_INDEXES [1, 4, 7, 10]
            window_block_indexes=[0, 2, 3, 5, 6, 8, 9],
            use_rel_pos=True,
            rel_pos_grid=(64, 64),  # REL_POS_IMG_SIZE 1024 / 16
            use_act_checkpoint=False,
            compile_blocks=False,  # MODEL.CONVMAE.COMPILE (off on the CPU whatever this says)
            out_features=("s16",),
        ),
        in_feature="s16",
        out_channels=256,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=L(last_level_max_pool)(in_feature="p5"),  # p6, as build_convmae_sfp_backbone
        norm="LN",
        square_pad=1024,
        feature_norm="",  # MODEL.CONVMAE.PYRAMID.FEATURE_NORM: "BN" standardises s16 first
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels="${...backbone.out_channels}", num_anchors=3, conv_dims=[-1, -1]),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[32], [64], [128], [256], [512]],
            aspect_ratios=[[0.5, 1.0, 2.0]],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=(1.0, 1.0, 1.0, 1.0)),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 1000),  # (train, test)
        post_nms_topk=(1000, 1000),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=80,
        batch_size_per_image=512,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(
            output_size=7,
            scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        box_head=L(FastRCNNConvFCHead)(  # ROI_BOX_HEAD ConvMAEConvFCHead: 4 conv + 1 fc, LN
            input_shape=L(ShapeSpec)(channels="${....backbone.out_channels}", height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm=LN,
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=L(ShapeSpec)(channels=1024),  # the box head's last fc
            box2box_transform=L(Box2BoxTransform)(weights=(10.0, 10.0, 5.0, 5.0)),
            num_classes="${..num_classes}",
            test_score_thresh=0.05,
            test_nms_thresh=0.5,
            test_topk_per_image=100,  # TEST.DETECTIONS_PER_IMAGE
            loss_weight={"loss_box_reg": 1.0},  # ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT
        ),
        mask_in_features=["p2", "p3", "p4", "p5"],
        mask_pooler=L(ROIPooler)(
            output_size=14,
            scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        mask_head=L(MaskRCNNConvUpsampleHead)(  # ROI_MASK_HEAD ConvMAEMaskHead: 4 conv, LN
            input_shape=L(ShapeSpec)(channels="${....backbone.out_channels}", width=14, height=14),
            num_classes="${..num_classes}",
            conv_dims=[256, 256, 256, 256, 256],  # NUM_CONV convs, then the deconv
            conv_norm=LN,
        ),
    ),
    pixel_mean=[123.675, 116.28, 103.53],  # RGB, ImageNet statistics as in pretraining
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)

dataloader = dict(
    train=L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names="coco_2017_train", filter_empty=True),
        mapper=L(DatasetMapper)(  # INPUT.LSJ: flip, ResizeScale 0.1-2.0, FixedSizeCrop(1024, pad=False)
            is_train=True,
            augmentations=L(build_lsj_augmentations)(image_size=1024, min_scale=0.1, max_scale=2.0, pad=False),
            image_format="RGB",
            use_instance_mask=True,
            recompute_boxes=True,  # boxes of cropped instances follow their masks
        ),
        total_batch_size=16,
        num_workers=4,
    ),
    test=L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
        mapper=L(DatasetMapper)(
            is_train=False,
            augmentations=[
                L(T.ResizeShortestEdge)(short_edge_length=1024, max_size=1024, sample_style="choice"),
            ],
            image_format="${...train.mapper.image_format}",
            use_instance_mask=True,  # as the yacs mapper (MODEL.MASK_ON); test images have no annotations
        ),
        num_workers="${..train.num_workers}",
    ),
    evaluator=L(COCOEvaluator)(
        dataset_name="${..test.dataset.names}",
        output_dir="${train.output_dir}/inference",
        # TEST.FAST_COCO_EVAL: "auto", "true", "false", "compiled", "faster_coco_eval", "pycocotools"
        backend=L(resolve_coco_eval_backend)(value="auto"),
    ),
)

optimizer = L(AdamW)(
    # SOLVER.WEIGHT_DECAY*, SOLVER.LAYER_DECAY; params.model is set to the model by the trainer
    params=L(get_param_groups)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm=0.0,
        weight_decay_pos_embed=0.0,
        layer_decay=1.0,
        norm_includes_d2_layernorm=False,  # SOLVER.WEIGHT_DECAY_NORM_ALL_LN
    ),
    lr=0.001,  # SOLVER.BASE_LR: detectron2's default; each config sets its own
    betas=(0.9, 0.999),
    weight_decay=0.1,
)

# SOLVER.STEPS, GAMMA, WARMUP_*: fractions of train.max_iter, so they scale with it (as in
# ViTDet's configs); detectron2's defaults here, each config sets its schedule
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[30000], num_updates=40000),
    warmup_length=1000 / 40000,
    warmup_factor=0.001,
    warmup_method="linear",
)

train = dict(
    output_dir="./output",
    init_checkpoint="",  # MODEL.WEIGHTS
    max_iter=40000,
    amp=dict(enabled=False),  # SOLVER.AMP.ENABLED (off on the CPU)
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    # SOLVER.CHECKPOINT_PERIOD; max_to_keep (SOLVER.CHECKPOINT_MAX_TO_KEEP): None keeps all
    checkpointer=dict(period=5000, max_to_keep=None),
    eval_period=0,  # TEST.EVAL_PERIOD; 0: only after training
    log_period=20,
    device="cuda",  # MODEL.DEVICE (the CPU when there is no GPU)
    seed=-1,
    cudnn_benchmark=False,
    # SOLVER.CLIP_GRADIENTS, detectron2's clipping ("norm" and "value" are per parameter)
    clip_gradients=dict(enabled=False, clip_type="value", clip_value=1.0, norm_type=2.0),
    # SOLVER.FUSED: fused optimizer kernels when every parameter is on CUDA and clipping is off
    fused_optimizer=True,
    vis=dict(num_images=0, score_thresh=0.5),  # TEST.VIS_NUM_IMAGES, TEST.VIS_SCORE_THRESH
)
