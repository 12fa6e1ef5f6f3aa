# ConvMAE-B with the multi-scale simple pyramid: p2/p3 from the conv stages' own features.
from detectron2.config import LazyCall as L

from convmae_det.modeling import MultiScaleSimpleFeaturePyramid

from .mask_rcnn_convmae_base_25ep import dataloader, lr_multiplier, model, optimizer, train

# MODEL.BACKBONE.NAME build_convmae_msfp_backbone: the same encoder, with the stride 4-32 outputs
model.backbone = L(MultiScaleSimpleFeaturePyramid)(
    net=model.backbone.net,
    out_channels=model.backbone.out_channels,
    square_pad=model.backbone.square_pad,
    in_features="${.net.out_features}",  # MODEL.CONVMAE.PYRAMID.MSFP_IN_FEATURES
)
model.backbone.net.out_features = ("s4", "s8", "s16", "s32")
train.output_dir = "output/mask_rcnn_convmae_base_msfp_25ep"
