# ConvMAE-Small Mask R-CNN with the Base recipe (25 COCO epochs, 8 GPUs). No published result.
from convmae_det.modeling import convvit_kwargs

from .mask_rcnn_convmae_base_25ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.update(convvit_kwargs("small"))  # MODEL.CONVMAE.SIZE "small"
train.output_dir = "output/mask_rcnn_convmae_small_25ep"
