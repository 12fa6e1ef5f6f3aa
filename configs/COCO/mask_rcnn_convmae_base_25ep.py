# ConvMAE-B Mask R-CNN, ViTDet-style, 25 COCO epochs on 8 GPUs (Official-ConvMAE-Det recipe,
# reference section 4): the LazyConfig twin of mask_rcnn_convmae_base_25ep.yaml.
# Published: 53.9 box AP / 47.6 mask AP on val2017 (not measured here).
# Initialise from a converted pretraining checkpoint: train.init_checkpoint=path/to/convmae_base_d2.pth
from ..common.mask_rcnn_convmae import dataloader, lr_multiplier, model, optimizer, train

# torch.compile'd blocks on the GPU (not in the official code; same function, faster training:
# see MODEL_ZOO.md "GPU"). Off on the CPU
model.backbone.net.compile_blocks = True

dataloader.train.dataset.names = "coco_2017_train"
dataloader.test.dataset.names = "coco_2017_val"
dataloader.train.num_workers = 4
dataloader.train.total_batch_size = 16

optimizer.lr = 1e-4
optimizer.params.layer_decay = 0.8

train.max_iter = 184375
lr_multiplier.scheduler.values = [1.0, 0.1, 0.01]
lr_multiplier.scheduler.milestones = [163889, 177546]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 250 / train.max_iter

train.checkpointer = dict(period=5000, max_to_keep=2)  # as the official ConvMAE-Det config (model_final.pth is kept besides)
train.amp.enabled = True
train.eval_period = 7500  # official: train.eval_period = 7500
train.output_dir = "output/mask_rcnn_convmae_base_25ep"
