"""Drawing a model's predictions on an image with detectron2's Visualizer."""
import numpy as np
import torch
from detectron2.data.catalog import Metadata
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["draw_predictions", "draw_sem_seg"]


def draw_predictions(image_rgb: np.ndarray, instances: Instances, metadata=None, score_thresh: float = 0.0) -> np.ndarray:
    """Boxes, masks and class names of the ``instances`` scoring at least ``score_thresh``,
    drawn over ``image_rgb`` (HxWx3, RGB); returns the drawn HxWx3 uint8 RGB image.

    ``instances`` may live on any device (they are moved to the CPU); ``metadata`` (a
    detectron2 Metadata with ``thing_classes``) names the classes, else class ids are shown.
    """
    instances = instances.to("cpu")
    if instances.has("scores"):
        instances = instances[instances.scores >= score_thresh]
    vis = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    return np.asarray(vis.draw_instance_predictions(instances).get_image())


def draw_sem_seg(image_rgb: np.ndarray, sem_seg, metadata=None, alpha: float = 0.5) -> np.ndarray:
    """Per-pixel classes drawn over ``image_rgb`` (HxWx3, RGB) with the names of
    ``metadata.stuff_classes``; returns the drawn HxWx3 uint8 RGB image.

    ``sem_seg`` is a K x H x W tensor of class scores (SemanticSegmentor's output, any device)
    or an H x W array of class ids; ids outside the classes (the ignore label) are not drawn.
    Colours are ``metadata.stuff_colors`` or, where the metadata has none (detectron2's
    ADE20K), a fixed palette, so that a prediction and its ground truth drawn apart match.
    ``alpha`` 0.5 is what detectron2 draws ground truth with."""
    if isinstance(sem_seg, torch.Tensor):
        sem_seg = (sem_seg.argmax(dim=0) if sem_seg.dim() == 3 else sem_seg).to("cpu").numpy()
    classes = list(metadata.get("stuff_classes", None) or []) if metadata is not None else []
    if not classes:
        classes = [str(i) for i in range(int(sem_seg.max()) + 1)]
    colors = metadata.get("stuff_colors", None) if metadata is not None else None
    if not colors or len(colors) < len(classes):
        colors = np.random.default_rng(0).integers(0, 256, (len(classes), 3)).tolist()
    vis = Visualizer(image_rgb, Metadata(stuff_classes=classes, stuff_colors=colors))
    return np.asarray(vis.draw_sem_seg(sem_seg, area_threshold=0, alpha=alpha).get_image())
