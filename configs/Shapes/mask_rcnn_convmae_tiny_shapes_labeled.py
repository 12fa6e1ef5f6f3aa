# Label-efficient finetuning on the built-in data: the tiny shapes recipe on the first 100
# labeled training images, 300 iterations (24 epochs of 100 images); the LazyConfig twin of
# mask_rcnn_convmae_tiny_shapes_labeled.yaml (random initialisation).
from .mask_rcnn_convmae_tiny_shapes import dataloader, lr_multiplier, model, optimizer, train

dataloader.train.dataset.names = "convmae_shapes_train_100"
train.max_iter = 300
lr_multiplier.scheduler.milestones = [270, 290]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 50 / train.max_iter
train.checkpointer.period = 1000000  # only model_final.pth: a grid runs many of these
train.output_dir = "output/shapes_tiny_labeled_scratch"
