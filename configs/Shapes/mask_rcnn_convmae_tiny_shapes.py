# Tiny ConvMAE Mask R-CNN on the built-in shapes dataset (128x128 images), sized for a 2-core CPU:
# the LazyConfig twin of mask_rcnn_convmae_tiny_shapes.yaml.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from convmae_det.modeling import MultiScaleSimpleFeaturePyramid, convvit_kwargs

from ..common.mask_rcnn_convmae import dataloader, lr_multiplier, model, optimizer, train

# MODEL.BACKBONE.NAME build_convmae_msfp_backbone
model.backbone.net.update(convvit_kwargs("tiny"))
model.backbone.net.update(
    window_size=4,
    window_block_indexes=[0, 2],  # GLOBAL_ATTN_INDEXES [1, 3]
    rel_pos_grid=(8, 8),  # REL_POS_IMG_SIZE 128 / 16
    drop_path_rate=0.0,
    out_features=("s8", "s16", "s32"),  # MSFP_IN_FEATURES: p3-p6, objects are >= 22 px, p2 would cost the most
)
model.backbone = L(MultiScaleSimpleFeaturePyramid)(
    net=model.backbone.net, out_channels=64, square_pad=128, in_features="${.net.out_features}"
)

model.proposal_generator.in_features = ["p3", "p4", "p5", "p6"]
model.proposal_generator.anchor_generator.sizes = [[24], [48], [96], [192]]
model.proposal_generator.anchor_generator.strides = [8, 16, 32, 64]
model.proposal_generator.head.conv_dims = [-1]
model.proposal_generator.pre_nms_topk = (300, 300)
model.proposal_generator.post_nms_topk = (150, 100)
model.proposal_generator.batch_size_per_image = 128

model.roi_heads.num_classes = 5
model.roi_heads.batch_size_per_image = 32
model.roi_heads.box_in_features = model.roi_heads.mask_in_features = ["p3", "p4", "p5"]
# (names without a leading _ would become config keys: LazyConfig keeps a config file's dicts)
for _pooler in (model.roi_heads.box_pooler, model.roi_heads.mask_pooler):
    _pooler.scales = (1.0 / 8, 1.0 / 16, 1.0 / 32)
    _pooler.canonical_box_size = 40  # ROI_HEADS.CANONICAL_BOX_SIZE: 224 is for COCO-sized images
# the standard 2-fc head: the CPU budget goes to iterations, not head convs
model.roi_heads.box_head.conv_dims = []
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape.channels = 256
model.roi_heads.box_predictor.test_topk_per_image = 50  # TEST.DETECTIONS_PER_IMAGE
model.roi_heads.mask_head.conv_dims = [64, 64]  # one conv, then the deconv

dataloader.train.dataset.names = "convmae_shapes_train"
dataloader.test.dataset.names = "convmae_shapes_val"
dataloader.train.num_workers = 1
dataloader.train.total_batch_size = 8
# INPUT.LSJ.ENABLED False (a 7-minute schedule learns faster without jitter): detectron2's
# default training augmentation at 128 px, and test images at 128 px
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(128,), max_size=128, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True, vertical=False),
]
dataloader.train.mapper.recompute_boxes = False
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128, sample_style="choice"),
]

optimizer.lr = 0.0005
optimizer.weight_decay = 0.05

train.max_iter = 600
lr_multiplier.scheduler.values = [1.0, 0.1, 0.01]
lr_multiplier.scheduler.milestones = [540, 580]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 50 / train.max_iter

train.checkpointer.period = 250
train.clip_gradients = dict(enabled=True, clip_type="norm", clip_value=1.0, norm_type=2.0)
train.vis = dict(num_images=4, score_thresh=0.3)
train.seed = 0  # fixed, so that the demo is repeatable
train.output_dir = "output/shapes_tiny_scratch"
