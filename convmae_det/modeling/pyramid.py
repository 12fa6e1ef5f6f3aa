"""Detectron2 backbones: a ConvViT encoder under a simple feature pyramid.

* :class:`SimpleFeaturePyramid` is ViTDet's pyramid built from the stride-16 output alone
  (deconvolutions up, max pool down). Its parameters are named ``simfp_{2,3,4,5}`` like the
  official ConvMAE detection checkpoints, and the encoder sits under ``net``.
* :class:`MultiScaleSimpleFeaturePyramid` takes p2 and p3 from the conv stages' own stride-4
  and stride-8 features instead of deconvolving the stride-16 output, and p5 from a max pool.

Both emit p2-p6 (p6 = LastLevelMaxPool of p5) with ``out_channels`` channels and channel
LayerNorm. With ``square_pad`` > 0 the input is zero-padded at the bottom and right to a square
of that size, as ViTDet pads every image to 1024x1024 for the COCO recipe.
"""
import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from .convvit import ConvViT, _layer_norm_nhwc
from .layers import D2LayerNorm, LayerNorm2d

__all__ = ["SimpleFeaturePyramid", "MultiScaleSimpleFeaturePyramid", "pad_to_square", "run_stage_nhwc"]


def pad_to_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad B C H W at the bottom and right to size x size; error if the input is larger."""
    H, W = x.shape[-2:]
    if H > size or W > size:
        raise ValueError(f"input {H}x{W} is larger than the square padding size {size}")
    if (H, W) == (size, size):
        return x
    return F.pad(x, (0, size - W, 0, size - H))


def _deconv2x2_nhwc(deconv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-2 stride-2 transposed conv on B H W C as one matmul to the 2x2 output cells of
    each input cell, then an interleave: y[2h+i, 2w+j] = x[h, w] @ W[:, :, i, j] + b."""
    B, H, W, _ = x.shape
    cout = deconv.out_channels
    y = F.linear(x, deconv.weight.permute(2, 3, 1, 0).reshape(4 * cout, -1))  # B H W (i j cout)
    y = y.view(B, H, W, 2, 2, cout).permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, cout)
    return y + deconv.bias.to(y.dtype) if deconv.bias is not None else y  # no fp32 promotion under autocast


def _is_plain(conv: nn.modules.conv._ConvNd, kernel: int, stride: int) -> bool:
    return (
        conv.kernel_size == (kernel, kernel) and conv.stride == (stride, stride) and conv.groups == 1
        and conv.dilation == (1, 1) and conv.padding in ((0, 0), "valid")
        and getattr(conv, "output_padding", (0, 0)) == (0, 0)
    )


def _norm_nhwc(norm: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    if norm is None:
        return x
    if isinstance(norm, LayerNorm2d):
        return _layer_norm_nhwc(norm, x)
    return norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def run_stage_nhwc(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The fast path of a pyramid stage: B H W C in, B H W C out, the same function as
    ``stage`` on the NCHW view. 1x1 convs and the kernel-2 stride-2 deconvolutions are matmuls
    on the token layout and the channel LayerNorms need no permute. A spatial conv runs on
    contiguous NCHW on the CPU, where oneDNN's backward of a channels-last 3x3 conv took 2.4x
    longer, and channels-last on the GPU."""
    for layer in stage:
        if isinstance(layer, nn.ConvTranspose2d) and _is_plain(layer, 2, 2):
            x = _deconv2x2_nhwc(layer, x)
        elif isinstance(layer, LayerNorm2d):
            x = _norm_nhwc(layer, x)
        elif isinstance(layer, nn.Conv2d):
            if _is_plain(layer, 1, 1):
                x = F.linear(x, layer.weight.flatten(1), layer.bias)
            else:
                y = x.permute(0, 3, 1, 2)
                y = y.contiguous() if y.device.type == "cpu" else y.contiguous(memory_format=torch.channels_last)
                x = layer._conv_forward(y, layer.weight, layer.bias).permute(0, 2, 3, 1)
            x = _norm_nhwc(getattr(layer, "norm", None), x)
            if getattr(layer, "activation", None) is not None:
                x = layer.activation(x)
        else:  # elementwise layers and pooling: on the NCHW view
            x = layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return x


def _out_convs(in_dim: int, out_channels: int, norm_eps: float = 1e-6):
    """1x1 conv + LN, then 3x3 conv + LN, both without bias (ViTDet)."""
    return [
        Conv2d(in_dim, out_channels, 1, bias=False, norm=D2LayerNorm(out_channels, eps=norm_eps)),
        Conv2d(out_channels, out_channels, 3, padding=1, bias=False, norm=D2LayerNorm(out_channels, eps=norm_eps)),
    ]


class _PyramidBase(Backbone):
    """Shared parts: square padding, input checks, p6 and the output specs."""

    def __init__(self, net: ConvViT, out_channels: int, square_pad: int, strides: Sequence[int]):
        super().__init__()
        self.net = net
        self.top_block = LastLevelMaxPool()
        self.square_pad = square_pad
        strides = list(strides) + [strides[-1] * 2]
        self._out_features = [f"p{int(math.log2(s))}" for s in strides]
        self._out_feature_strides = {f: s for f, s in zip(self._out_features, strides)}
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self._size_divisibility = strides[-2]

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        # read by detectron2 releases newer than 0.6 to pad the ImageList itself
        return {"size_divisiblity": self._size_divisibility, "square_size": self.square_pad}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.square_pad > 0:
            x = pad_to_square(x, self.square_pad)
        H, W = x.shape[-2:]
        d = self._size_divisibility
        if H % d or W % d:
            raise ValueError(f"input {H}x{W}: height and width must be multiples of {d}")
        return x

    def _run_stages(self, stages, feats):
        """Each stage on its NCHW input; the encoder's fast path runs them on B H W C
        (:func:`run_stage_nhwc`) and returns NCHW views of that memory."""
        if self.net.impl != "fast":
            return [stage(f) for stage, f in zip(stages, feats)]
        return [run_stage_nhwc(stage, f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for stage, f in zip(stages, feats)]

    def _finish(self, results):
        results.extend(self.top_block(results[-1]))
        return dict(zip(self._out_features, results))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
            for f in self._out_features
        }


class SimpleFeaturePyramid(_PyramidBase):
    """ViTDet's simple feature pyramid over the encoder's stride-16 output."""

    def __init__(
        self,
        net: ConvViT,
        *,
        out_channels: int = 256,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        square_pad: int = 0,
        norm_eps: float = 1e-6,
    ):
        strides = [int(16 / s) for s in scale_factors]
        super().__init__(net, out_channels, square_pad, strides)
        dim = net.embed_dims[2]
        for scale, stride in zip(scale_factors, strides):
            if scale == 4.0:
                layers = [
                    nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                    D2LayerNorm(dim // 2, eps=norm_eps),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
                ]
                in_dim = dim // 4
            elif scale == 2.0:
                layers, in_dim = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.0:
                layers, in_dim = [], dim
            elif scale == 0.5:
                layers, in_dim = [nn.MaxPool2d(2, 2)], dim
            else:
                raise ValueError(f"scale factor {scale} is not supported; use 4, 2, 1 or 0.5")
            layers += _out_convs(in_dim, out_channels, norm_eps)
            self.add_module(f"simfp_{int(math.log2(stride))}", nn.Sequential(*layers))
        self._stages = [getattr(self, f"simfp_{int(math.log2(s))}") for s in strides]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self._prepare(x)
        feat = self.net(x)["s16"]
        return self._finish(self._run_stages(self._stages, [feat] * len(self._stages)))


class MultiScaleSimpleFeaturePyramid(_PyramidBase):
    """A simple pyramid that reuses the conv stages: p2 <- s4, p3 <- s8, p4 <- s16, p5 <- s32.

    ``in_features`` picks a contiguous run of those levels (e.g. ("s8", "s16", "s32") for
    p3-p6 when small images make p2 a waste of compute); p6 is always a max pool of the last.
    """

    LEVELS = ("s4", "s8", "s16", "s32")

    def __init__(
        self,
        net: ConvViT,
        *,
        out_channels: int = 256,
        square_pad: int = 0,
        norm_eps: float = 1e-6,
        in_features: Sequence[str] = ("s4", "s8", "s16", "s32"),
    ):
        in_features = list(in_features)
        idx = [self.LEVELS.index(f) if f in self.LEVELS else -1 for f in in_features]
        if not in_features or -1 in idx or idx != list(range(idx[0], idx[0] + len(idx))):
            raise ValueError(f"in_features must be a contiguous run of {list(self.LEVELS)}, got {in_features}")
        strides = [net.out_feature_strides[f] for f in in_features]
        super().__init__(net, out_channels, square_pad, strides)
        missing = set(in_features) - set(net._out_features)
        if missing:
            raise ValueError(f"the encoder does not output {sorted(missing)}; build it with out_features={in_features}")
        channels = net.out_feature_channels
        self._in_features = in_features
        for name, stride in zip(in_features, strides):
            self.add_module(f"simfp_{int(math.log2(stride))}", nn.Sequential(*_out_convs(channels[name], out_channels, norm_eps)))
        self._stages = [getattr(self, f"simfp_{int(math.log2(s))}") for s in strides]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self._prepare(x)
        feats = self.net(x)
        return self._finish(self._run_stages(self._stages, [feats[name] for name in self._in_features]))
