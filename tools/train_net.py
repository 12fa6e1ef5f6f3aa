#!/usr/bin/env python
"""convmae-train from a clone: the code is convmae_det/cli/train_net.py (see its --help)."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702
from convmae_det.cli.train_net import cli, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(cli())
