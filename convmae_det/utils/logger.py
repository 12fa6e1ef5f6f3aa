"""The project's logger: ``convmae_det`` (modules log to its children, ``convmae_det.data``, ...),
set up by the tools with detectron2's ``setup_logger`` like detectron2's own."""
import logging
from typing import Optional

from detectron2.utils.logger import setup_logger

__all__ = ["setup_logging"]


def setup_logging(output: Optional[str] = None, distributed_rank: int = 0) -> logging.Logger:
    """Log ``convmae_det`` and its children to the console (rank 0) and, with ``output`` (a
    folder, or a .txt/.log file), to ``output/log.txt`` (``log.txt.rankN`` on other ranks), in
    detectron2's format. Once per process and output, as detectron2's ``setup_logger``."""
    return setup_logger(output, distributed_rank, name="convmae_det", abbrev_name="convmae")
