"""Finetune grids over initialisations, labeled-split sizes and seeds: convmae-seed-grid (from a
clone: python tools/seed_grid.py); see convmae_det.utils.seed_grid and --help."""
import sys

from convmae_det.utils import seed_grid
from convmae_det.utils.logger import setup_logging

__all__ = ["main"]


def main(argv=None):
    setup_logging()
    seed_grid.main(argv)


if __name__ == "__main__":
    sys.exit(main())
