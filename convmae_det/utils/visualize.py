"""Drawing a model's predictions on an image with detectron2's Visualizer."""
import numpy as np
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["draw_predictions"]


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
