import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_convvit_kwargs(**over):
    kw = dict(embed_dims=(32, 48, 64), depths=(1, 1, 2), num_heads=2, pretrain_img_size=64)
    kw.update(over)
    return kw
