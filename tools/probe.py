#!/usr/bin/env python
"""convmae-probe from a clone: the code is convmae_det/cli/probe.py (see its --help)."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702
from convmae_det.cli.probe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
