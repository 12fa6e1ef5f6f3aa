# The tiny shapes recipe initialised from a ConvMAE pretrained on the built-in training images
# at 128 px (make demo: tools/pretrain.py -> tools/convert_pretrain.py -> this config).
from .mask_rcnn_convmae_tiny_shapes import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = "output/demo/pretrain/convmae_tiny_d2.pth"
model.backbone.net.pretrain_img_size = 128  # the position embedding of the pretraining run: 8x8
train.output_dir = "output/demo/finetune"
