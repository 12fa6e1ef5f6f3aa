"""Where a library provides what the project wrote by hand, the library's version is used or
checked equal: timm's ConvMlp, timm's SAM block (the reference's stage-3 block), torchvision's
save_image (the reconstruction grid)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.layers import ConvMlp as TimmConvMlp
from timm.models.vision_transformer_sam import Block as SamBlock

from conftest import assert_same_function, randomize_, tiny_mae_kwargs
from convmae_det.modeling.convvit import ConvMlp
from convmae_det.modeling.reference import ReferenceBlock, ReferenceConvBlock


def test_conv_mlp_is_timms_on_channels_last():
    """The product's MLP is timm's ConvMlp (same parameters) applied to B H W C; the reference
    conv block uses timm's own."""
    fast = randomize_(ConvMlp(16, 64))
    assert set(fast.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}

    class TimmOnNHWC(TimmConvMlp):  # timm's own forward, on the same B H W C input
        def forward(self, x):
            return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    timm_mlp = TimmOnNHWC(16, 64, act_layer=nn.GELU)
    assert_same_function(fast, timm_mlp, torch.randn(2, 5, 6, 16, requires_grad=True), atol=1e-5)
    assert type(ReferenceConvBlock(16).mlp) is TimmConvMlp


@pytest.mark.parametrize("window,hw,rel_pos_size", [(3, (5, 7), None), (0, (4, 5), (4, 5)), (0, (6, 6), (4, 5))])
def test_reference_block_equals_timm_sam_block(window, hw, rel_pos_size):
    """The reference stage-3 block (ViTDet's) and timm's SAM block load the same state dict and
    compute the same function: windows with padding, global attention with relative position,
    a table resized for another grid."""
    ref = randomize_(ReferenceBlock(48, 3, window_size=window, use_rel_pos=True, rel_pos_size=rel_pos_size), std=0.5)
    sam = SamBlock(48, 3, use_rel_pos=True, window_size=window, input_size=rel_pos_size)
    assert_same_function(ref, sam, torch.randn(2, *hw, 48, requires_grad=True), atol=1e-5)


def test_reconstruction_grid_is_one_row_per_kind(tmp_path):
    """torchvision's save_image lays out originals, masked inputs and reconstructions, one image
    per column and no padding: (3H) x (B W), the top row the de-normalised originals."""
    from PIL import Image

    from convmae_det.pretrain import ConvMAE
    from convmae_det.pretrain.data import IMAGENET_MEAN, IMAGENET_STD
    from convmae_det.pretrain.engine import reconstruction_grid

    model = ConvMAE(**tiny_mae_kwargs())
    images = [torch.randn(3, 64, 64) for _ in range(3)]
    png = np.asarray(Image.open(reconstruction_grid(model, images, 0.75, str(tmp_path / "g.png"), "cpu")))
    assert png.shape == (3 * 64, 3 * 64, 3)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for i, img in enumerate(images):
        want = ((img * std + mean).clamp(0, 1) * 255).permute(1, 2, 0).numpy()
        assert np.abs(png[:64, 64 * i: 64 * (i + 1)] - want).max() <= 0.5 + 1e-3
