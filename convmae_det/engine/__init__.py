from .trainer import Trainer, setup_cfg, visualize_predictions

__all__ = ["Trainer", "setup_cfg", "visualize_predictions"]
