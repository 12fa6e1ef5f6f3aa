# The label-efficient finetune of mask_rcnn_convmae_tiny_shapes_labeled.py, initialised from a
# ConvMAE pretrained on the unlabeled pool (make demo: tools/pretrain.py on
# datasets/convmae_shapes/pool -> tools/convert_pretrain.py -> this config).
from .mask_rcnn_convmae_tiny_shapes_labeled import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = "output/demo/pretrain/convmae_tiny_d2.pth"
model.backbone.net.pretrain_img_size = 128  # the position embedding of the pretraining run: 8x8
train.output_dir = "output/shapes_tiny_labeled_pretrained"
