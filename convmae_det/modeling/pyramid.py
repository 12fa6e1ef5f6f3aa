"""Detectron2 backbones: a ConvViT encoder under a simple feature pyramid.

* :class:`SimpleFeaturePyramid` is ViTDet's pyramid, with ViTDet's signature, built from one
  output of any backbone with ``output_shape()`` (deconvolutions up, max pool down); for the
  ConvViT that is the stride-16 output. Its parameters are named ``simfp_{2,3,4,5}`` like the
  official ConvMAE detection checkpoints, and the encoder sits under ``net``.
* :class:`MultiScaleSimpleFeaturePyramid` takes p2 and p3 from the conv stages' own stride-4
  and stride-8 features instead of deconvolving the stride-16 output, and p5 from a max pool.

The builders make both emit p2-p6 (p6 = LastLevelMaxPool of p5) with ``out_channels`` channels
and channel LayerNorm. With ``square_pad`` > 0 the input is zero-padded at the bottom and right
to a square of that size, as ViTDet pads every image to 1024x1024 for the COCO recipe.

Layout: with ``channels_last=True`` (the default) the pyramid's stages are built from small
modules that take B H W C (:class:`Deconv2x2`, :class:`ConvNHWC`, channel LayerNorms without
permutes), fed with the B H W C memory behind the encoder's NCHW outputs; with
``channels_last=False`` they are plain ``nn.Sequential`` NCHW stages of torch and detectron2
layers, as in the official model (the reference). Both have the same parameter names. The
B H W C layers take the channel LayerNorm ("LN") or no norm (""); another detectron2 norm
("BN", "GN", ...) builds NCHW stages.
"""
import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from .layers import D2LayerNorm

NormSpec = Union[str, Callable[[int], nn.Module]]

__all__ = [
    "SimpleFeaturePyramid",
    "feature_norms",
    "last_level_max_pool",
    "MultiScaleSimpleFeaturePyramid",
    "pad_to_square",
    "Deconv2x2",
    "ConvNHWC",
    "MaxPool2x2NHWC",
]


def pad_to_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad B C H W at the bottom and right to size x size; error if the input is larger.

    Pads even an input that is already square (a zero-size pad, which returns a copy): a
    ``torch.jit.trace`` then records the pad from the input's size, and the trace serves every
    input size, where an early return would bake the sample's size into it."""
    H, W = x.shape[-2:]
    if H > size or W > size:
        raise ValueError(f"input {H}x{W} is larger than the square padding size {size}")
    return F.pad(x, (0, size - W, 0, size - H))


def last_level_max_pool(in_feature: str = "p5") -> LastLevelMaxPool:
    """detectron2's p6 block (a stride-2 max pool) reading the pyramid level ``in_feature``."""
    block = LastLevelMaxPool()
    block.in_feature = in_feature
    return block


class Deconv2x2(nn.ConvTranspose2d):
    """A kernel-2 stride-2 transposed conv on B H W C: one matmul to the 2x2 output cells of
    each input cell, then an interleave: y[2h+i, 2w+j] = x[h, w] @ W[:, :, i, j] + b."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        cout = self.out_channels
        y = F.linear(x, self.weight.permute(2, 3, 1, 0).reshape(4 * cout, -1))  # B H W (i j cout)
        y = y.view(B, H, W, 2, 2, cout).permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, cout)
        return y + self.bias.to(y.dtype) if self.bias is not None else y  # no fp32 promotion under autocast


class ConvNHWC(nn.Conv2d):
    """detectron2's ``Conv2d`` (conv, then optional ``norm`` and ``activation``) on B H W C.

    A 1x1 conv is a matmul over the channels. A spatial conv runs on contiguous NCHW on the
    CPU, where oneDNN's backward of a channels-last 3x3 conv took 2.4x longer, and on a
    channels-last view on the GPU."""

    def __init__(self, *args, norm: Optional[nn.Module] = None, activation: Optional[Callable] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1 and self.padding in ((0, 0), "valid"):
            x = F.linear(x, self.weight.flatten(1), self.bias)
        else:
            y = x.permute(0, 3, 1, 2)
            y = y.contiguous() if y.device.type == "cpu" else y.contiguous(memory_format=torch.channels_last)
            x = F.conv2d(y, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups).permute(0, 2, 3, 1)
        if self.norm is not None:
            x = self.norm(x)
        return self.activation(x) if self.activation is not None else x


class MaxPool2x2NHWC(nn.Module):
    """2x2 stride-2 max pool on B H W C."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).permute(0, 2, 3, 1)


class _Layers:
    """The pyramid's layer kinds in one layout: B H W C (``channels_last``) or NCHW, the plain
    torch and detectron2 layers of the official model. Same parameter names either way.

    ``norm`` as ViTDet's: "LN" (channel LayerNorm, eps ``norm_eps``), "" (none; the convs then
    have a bias) or, NCHW only, any other ``detectron2.layers.get_norm`` name or factory."""

    def __init__(self, channels_last: bool, norm_eps: float, norm: NormSpec = "LN"):
        if channels_last and norm not in ("LN", ""):
            raise ValueError(f"the channels-last pyramid takes norm 'LN' or '', got {norm!r}: use channels_last=False")
        self.channels_last, self.eps, self.norm_kind = channels_last, norm_eps, norm

    def deconv(self, cin: int, cout: int) -> nn.Module:
        return Deconv2x2(cin, cout) if self.channels_last else nn.ConvTranspose2d(cin, cout, 2, stride=2)

    def norm(self, channels: int) -> nn.Module:
        """The norm after a deconvolution (an ``nn.Identity`` for "": the indices stay)."""
        return self._norm(channels) or nn.Identity()

    def _norm(self, channels: int) -> Optional[nn.Module]:
        if self.norm_kind == "LN":
            return D2LayerNorm(channels, eps=self.eps, channels_last=self.channels_last)
        return get_norm(self.norm_kind, channels)  # None for ""

    def conv(self, cin: int, cout: int, kernel: int) -> nn.Module:
        cls = ConvNHWC if self.channels_last else Conv2d
        return cls(cin, cout, kernel, padding=kernel // 2, bias=self.norm_kind == "", norm=self._norm(cout))

    def pool(self) -> nn.Module:
        return MaxPool2x2NHWC() if self.channels_last else nn.MaxPool2d(2, 2)

    def out_convs(self, in_dim: int, out_channels: int) -> List[nn.Module]:
        """1x1 conv + norm, then 3x3 conv + norm, without bias when normed (ViTDet)."""
        return [self.conv(in_dim, out_channels, 1), self.conv(out_channels, out_channels, 3)]


FEATURE_NORMS = ("", "BN")


def feature_norms(kind: str, channels: Dict[str, int]) -> Optional[nn.ModuleDict]:
    """Normalisation of the encoder outputs the pyramid reads, per output name: "" none (the
    official model), "BN" a BatchNorm without affine parameters (per-channel standardisation by
    batch statistics in training, running ones in eval), as the MAE linear probe normalises
    frozen features. A pretrained encoder's stage-3 output can carry per-channel offsets far
    larger than its spatial variation, which the pyramid's 1x1 conv and per-position LayerNorm
    pass on; this removes them. With several processes each normalises with its own batch."""
    if kind not in FEATURE_NORMS:
        raise ValueError(f"feature norm {kind!r} is not one of {list(FEATURE_NORMS)}")
    if not kind:
        return None
    return nn.ModuleDict({name: nn.BatchNorm2d(c, affine=False) for name, c in channels.items()})


class _PyramidBase(Backbone):
    """Shared parts: square padding, input checks, the layout, the top block, the feature norm
    and the output specs."""

    def __init__(self, net: nn.Module, out_channels: int, square_pad: int, strides: Sequence[int],
                 channels_last: bool, top_block: Optional[nn.Module], feature_norm: str = "",
                 norm_inputs: Sequence[str] = ()):
        super().__init__()
        self.net = net
        shapes = net.output_shape()
        self.feature_norm = feature_norms(feature_norm, {f: shapes[f].channels for f in norm_inputs})
        self.top_block = top_block
        self.square_pad = square_pad
        self.channels_last = channels_last
        self._out_feature_strides = {f"p{int(math.log2(s))}": s for s in strides}
        if top_block is not None:  # its levels continue the pyramid (ViTDet)
            stage = int(math.log2(strides[-1]))
            for s in range(stage, stage + top_block.num_levels):
                self._out_feature_strides[f"p{s + 1}"] = 2 ** (s + 1)
        self._out_features = list(self._out_feature_strides)
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self._size_divisibility = strides[-1]

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

    def _normalise(self, feats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The encoder outputs with the feature norm applied to those it has (NCHW, any memory
        format); the others unchanged."""
        if self.feature_norm is None:
            return feats
        return {k: self.feature_norm[k](v) if k in self.feature_norm else v for k, v in feats.items()}

    def _run_stages(self, stages, feats):
        """Each stage on its NCHW input feature; channels-last stages take and give B H W C
        (the encoder's outputs are NCHW views of B H W C memory, so the permutes are free)."""
        if not self.channels_last:
            return [stage(f) for stage, f in zip(stages, feats)]
        return [stage(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for stage, f in zip(stages, feats)]

    def _finish(self, results: List[torch.Tensor], bottom_up: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The pyramid's maps, then the top block's, from a backbone output or a pyramid level."""
        if self.top_block is not None:
            name = self.top_block.in_feature
            top_in = bottom_up[name] if name in bottom_up else results[self._out_features.index(name)]
            results = results + list(self.top_block(top_in))
        return dict(zip(self._out_features, results))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
            for f in self._out_features
        }


def _log2_strides(strides: Sequence[int], what: str) -> None:
    for s in strides:
        if s < 1 or 2 ** int(math.log2(s)) != s:
            raise ValueError(f"{what} give the strides {list(strides)}: each must be a power of 2")
    for a, b in zip(strides, strides[1:]):
        if b != 2 * a:
            raise ValueError(f"{what} give the strides {list(strides)}: each must be twice the one before")


class SimpleFeaturePyramid(_PyramidBase):
    """ViTDet's simple feature pyramid over one output of ``net``, with ViTDet's arguments.

    ``net`` is any module with ``output_shape()`` (a detectron2 ``Backbone``, a ConvViT) whose
    forward returns a dict of NCHW maps; ``in_feature`` names the one the pyramid is built from
    ("s16" for a ConvViT). Each scale factor gives a level: 4 and 2 deconvolve, 1 keeps, 0.5
    max-pools, each followed by a 1x1 and a 3x3 conv with ``norm``. ``top_block`` (e.g.
    ``LastLevelMaxPool()`` for p6) extends the levels, as in detectron2's FPN.

    Beyond ViTDet: the input is zero-padded to ``square_pad`` here (detectron2 0.6 does not pad
    the ImageList for a backbone), ``norm_eps`` sets the LayerNorm's eps, ``channels_last``
    picks the layout (default: B H W C where ``norm`` allows, see the module docstring) and
    ``feature_norm`` ("" or "BN", :func:`feature_norms`) normalises ``in_feature`` first.
    """

    def __init__(
        self,
        net: nn.Module,
        in_feature: str,
        out_channels: int,
        scale_factors: Sequence[float],
        top_block: Optional[nn.Module] = None,
        norm: NormSpec = "LN",
        square_pad: int = 0,
        *,
        norm_eps: float = 1e-6,
        channels_last: Optional[bool] = None,
        feature_norm: str = "",
    ):
        if not callable(getattr(net, "output_shape", None)):
            raise TypeError(f"net must have output_shape() (a detectron2 Backbone or a ConvViT), got {type(net).__name__}")
        shapes = net.output_shape()
        if not scale_factors:
            raise ValueError("scale_factors is empty: give at least one of 4, 2, 1, 0.5")
        if in_feature not in shapes:
            raise ValueError(f"in_feature {in_feature!r} is not an output of the net: it has {sorted(shapes)}")
        strides = [int(shapes[in_feature].stride / s) for s in scale_factors]
        _log2_strides(strides, f"scale factors {list(scale_factors)} of a stride-{shapes[in_feature].stride} feature")
        if channels_last is None:
            channels_last = norm in ("LN", "")
        super().__init__(net, out_channels, square_pad, strides, channels_last, top_block, feature_norm, [in_feature])
        self.in_feature = in_feature
        self.scale_factors = tuple(scale_factors)
        dim = shapes[in_feature].channels
        L = _Layers(channels_last, norm_eps, norm)
        for scale, stride in zip(scale_factors, strides):
            if scale == 4.0:
                layers = [L.deconv(dim, dim // 2), L.norm(dim // 2), nn.GELU(), L.deconv(dim // 2, dim // 4)]
                in_dim = dim // 4
            elif scale == 2.0:
                layers, in_dim = [L.deconv(dim, dim // 2)], dim // 2
            elif scale == 1.0:
                layers, in_dim = [], dim
            elif scale == 0.5:
                layers, in_dim = [L.pool()], dim
            else:
                raise ValueError(f"scale factor {scale} is not supported; use 4, 2, 1 or 0.5")
            self.add_module(f"simfp_{int(math.log2(stride))}", nn.Sequential(*layers, *L.out_convs(in_dim, out_channels)))
        self._stages = [getattr(self, f"simfp_{int(math.log2(s))}") for s in strides]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self._prepare(x)
        feats = self._normalise(self.net(x))
        feat = feats[self.in_feature]
        return self._finish(self._run_stages(self._stages, [feat] * len(self._stages)), feats)


class MultiScaleSimpleFeaturePyramid(_PyramidBase):
    """A simple pyramid that reuses the conv stages: p2 <- s4, p3 <- s8, p4 <- s16, p5 <- s32.

    ``in_features`` picks a contiguous run of those levels (e.g. ("s8", "s16", "s32") for
    p3-p6 when small images make p2 a waste of compute); p6 is always a max pool of the last.
    ``feature_norm`` ("" or "BN", :func:`feature_norms`) normalises each of them first.
    """

    LEVELS = ("s4", "s8", "s16", "s32")

    def __init__(
        self,
        net: nn.Module,
        *,
        out_channels: int = 256,
        square_pad: int = 0,
        norm_eps: float = 1e-6,
        in_features: Sequence[str] = ("s4", "s8", "s16", "s32"),
        channels_last: bool = True,
        feature_norm: str = "",
    ):
        in_features = list(in_features)
        idx = [self.LEVELS.index(f) if f in self.LEVELS else -1 for f in in_features]
        if not in_features or -1 in idx or idx != list(range(idx[0], idx[0] + len(idx))):
            raise ValueError(f"in_features must be a contiguous run of {list(self.LEVELS)}, got {in_features}")
        shapes = net.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(f"the encoder does not output {missing}; build it with out_features={in_features}")
        strides = [shapes[f].stride for f in in_features]
        top_block = last_level_max_pool(f"p{int(math.log2(strides[-1]))}")  # p6 after p5, or after the last level
        super().__init__(net, out_channels, square_pad, strides, channels_last, top_block, feature_norm, in_features)
        self._in_features = in_features
        L = _Layers(channels_last, norm_eps)
        for name, stride in zip(in_features, strides):
            stage = nn.Sequential(*L.out_convs(shapes[name].channels, out_channels))
            self.add_module(f"simfp_{int(math.log2(stride))}", stage)
        self._stages = [getattr(self, f"simfp_{int(math.log2(s))}") for s in strides]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self._prepare(x)
        feats = self._normalise(self.net(x))
        return self._finish(self._run_stages(self._stages, [feats[name] for name in self._in_features]), feats)
