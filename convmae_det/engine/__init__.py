from .trainer import (
    Trainer,
    add_safety_arguments,
    build_predictor,
    exit_on_user_error,
    load_eval_weights,
    predict_images,
    prepare_output_dir,
    setup_cfg,
    visualize_predictions,
)

__all__ = [
    "Trainer",
    "add_safety_arguments",
    "build_predictor",
    "exit_on_user_error",
    "load_eval_weights",
    "predict_images",
    "prepare_output_dir",
    "setup_cfg",
    "visualize_predictions",
]
