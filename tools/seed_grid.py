#!/usr/bin/env python
"""Finetune grids over initialisations, labeled-split sizes and seeds (convmae_det.utils.seed_grid)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convmae_det.utils.seed_grid import main  # noqa: E402

if __name__ == "__main__":
    main(train_net=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_net.py"))
