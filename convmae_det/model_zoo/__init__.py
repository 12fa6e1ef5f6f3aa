"""The configs of convmae-det by name, from a clone or an installed package (detectron2's
``model_zoo.get_config_file`` for this project).

The repository's ``configs/`` folder is the one source: ``setup.py`` copies it into the package
(``convmae_det/model_zoo/configs``) when it builds, so an installed copy has the same files,
``_BASE_`` references and LazyConfig ``.py`` files included. In a clone the folder beside the
package is read.

    from convmae_det.model_zoo import get_config_file
    cfg = setup_cfg(get_config_file("COCO/mask_rcnn_convmae_base_25ep.yaml"))
"""
import os
from typing import List

__all__ = ["config_root", "list_configs", "get_config_file", "resolve_config_file"]

CONFIG_SUFFIXES = (".yaml", ".yml", ".py")
_PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_CLONE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def config_root() -> str:
    """The folder the configs are read from: the packaged copy if this is an installed package,
    else the clone's ``configs/``."""
    for root in (_PACKAGED, _CLONE):
        if os.path.isdir(root):
            return root
    raise FileNotFoundError(f"no convmae-det configs: neither {_PACKAGED} (installed) nor {_CLONE} (clone) exists")


def list_configs() -> List[str]:
    """Every config name (path relative to the configs folder, ``/``-separated), sorted."""
    root = config_root()
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        rel = os.path.relpath(folder, root)
        names += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files if f.endswith(CONFIG_SUFFIXES)]
    return sorted(names)


def get_config_file(name: str) -> str:
    """The path of config ``name``, e.g. ``"COCO/mask_rcnn_convmae_base_25ep.yaml"`` (a leading
    ``configs/`` is accepted too). FileNotFoundError naming the available configs if there is none."""
    rel = name.replace("\\", "/")
    for prefix in ("./", "configs/"):
        rel = rel[len(prefix):] if rel.startswith(prefix) else rel
    path = os.path.join(config_root(), *rel.split("/"))
    if not rel or os.path.isabs(name) or ".." in rel.split("/") or not os.path.isfile(path):
        raise FileNotFoundError(
            f"{name!r} is not a convmae-det config; available: {', '.join(list_configs())}"
        )
    return path


def resolve_config_file(path: str) -> str:
    """``path`` if it is a file, else the config of that name (:func:`get_config_file`), so that
    ``--config-file configs/COCO/...`` works from any folder with an installed package.
    FileNotFoundError naming ``path`` and the available configs if it is neither."""
    if os.path.isfile(path):
        return path
    try:
        return get_config_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"config file {path!r} does not exist, and it is not one of convmae-det's configs "
            f"({', '.join(list_configs())})"
        ) from None
