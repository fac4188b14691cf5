"""DDF building blocks: FilterNorm, DDFPack and DDFUpPack.

The parameter layout (and therefore the state-dict keys) of :class:`DDFPack` matches
the original release, so its checkpoints load strictly:

    spatial_branch.0.{weight,bias}   1x1 conv  C -> head*k*k (stride s)
    channel_branch.1.{weight,bias}   1x1 conv  C -> int(C*se_ratio)
    channel_branch.3.{weight,bias}   1x1 conv  int(C*se_ratio) -> C*k*k
    channel_branch.4.std             learnable FilterNorm scale, shape (C*k*k,)
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import calculate_gain

from ._checks import COMBINES
from ._checks import combine_code as _combine_code
from ._checks import check_choice as _check_choice
from ._checks import check_int as _check_int
from .functional import ddf
from .reference import filter_norm

__all__ = ["FilterNorm", "DDFPack", "DDFUpPack"]


def _notrace(cls):
    """Mark a module as a leaf for timm's torch.fx feature extraction (its forward checks shapes and calls a
    custom op, which symbolic tracing cannot follow); a no-op without timm."""
    try:
        from timm.layers import register_notrace_module
    except ImportError:
        return cls
    return register_notrace_module(cls)

_COMBINES = tuple(COMBINES)
_FILTERS = ("both", "spatial", "channel")
_NORMS = ("filter_norm", "batch_norm", "sigmoid")
#: DDFPack/DDFUpPack apply their spatial FilterNorm inside the op (spatial_norm=True) instead of materialising the
#: normalised filter; the FilterNorm module stays in the branch (state-dict layout) and defines the gain.
_FUSE_SPATIAL_NORM = True
#: DDFPack/DDFUpPack run their standard channel branch as linear ops on (B, C) matrices (FilterNormChannelBranch);
#: False runs the nn.Sequential as built (same parameters and math; for comparisons and benchmarks).
_FAST_CHANNEL_BRANCH = True
_NONLINEARITIES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                   "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")


def _check_se_ratio(owner: str, in_channels: int, se_ratio) -> float:
    if isinstance(se_ratio, bool) or not isinstance(se_ratio, numbers.Real):
        raise TypeError(f"{owner}: se_ratio must be a positive number, got {se_ratio!r}")
    se_ratio = float(se_ratio)
    if not se_ratio > 0:
        raise ValueError(f"{owner}: se_ratio must be > 0, got {se_ratio}")
    if int(in_channels * se_ratio) < 1:
        raise ValueError(
            f"{owner}: se_ratio={se_ratio} leaves int(in_channels*se_ratio) = 0 squeeze channels for "
            f"in_channels={in_channels}; use a larger se_ratio"
        )
    return se_ratio


def _normalise(y: torch.Tensor) -> torch.Tensor:
    """FilterNorm over dim 2, computed in float32 for half types (eps 1e-10 underflows in float16)."""
    if y.dtype == torch.float16 or y.dtype == torch.bfloat16:
        return filter_norm(y.float(), dim=2).to(y.dtype)
    return filter_norm(y, dim=2)


def _shape(x: torch.Tensor) -> str:
    """``str(tuple(x.shape))`` for error messages, written so that TorchScript compiles it too."""
    dims: List[str] = [str(n) for n in x.shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


@_notrace
class FilterNorm(nn.Module):
    """Filter normalisation (paper Eq. 3).

    Each filter is normalised over its ``k*k`` taps: subtract the mean, divide by
    (unbiased std + 1e-10), then multiply by a scale.

    * ``filter_type='spatial'``: input ``(B, head*k*k, H, W)``; one filter per pixel and head;
      fixed scale ``calculate_gain(nonlinearity) / k`` (not a parameter).
    * ``filter_type='channel'``: input ``(B, C*k*k[, 1, 1])``; one filter per channel; output
      ``(B, C*k*k)``. With ``running_std=True`` the scale is a learnable per-(channel, tap)
      parameter ``std`` of shape ``(C*k*k,)`` initialised as ``randn * gain / k``; otherwise the
      fixed scalar ``gain / k``.

    ``in_channels`` is the number of filters per sample that share nothing: ``head`` for
    spatial filters, ``C`` for channel filters.
    """

    def __init__(self, in_channels: int, kernel_size: int, filter_type: str,
                 nonlinearity: str = "linear", running_std: bool = False):
        super().__init__()
        self.in_channels = _check_int("FilterNorm", "in_channels", in_channels, 1)
        self.kernel_size = _check_int("FilterNorm", "kernel_size", kernel_size, 1)
        self.filter_type = _check_choice("FilterNorm", "filter_type", filter_type, ("spatial", "channel"))
        _check_choice("FilterNorm", "nonlinearity", nonlinearity, _NONLINEARITIES)
        if self.kernel_size * self.kernel_size < 2:
            raise ValueError("FilterNorm: kernel_size must be > 1 (the std over a single tap is undefined)")
        self.nonlinearity = nonlinearity
        self.running_std = bool(running_std)
        scale = calculate_gain(nonlinearity) / kernel_size
        if self.running_std:
            self.std = nn.Parameter(torch.randn(self.in_channels * kernel_size ** 2) * scale)
        else:
            self.std = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kk = self.kernel_size * self.kernel_size
        g = self.in_channels
        if self.filter_type == "spatial":
            if x.dim() != 4 or x.shape[1] != g * kk:
                raise ValueError(
                    f"FilterNorm(spatial): input must have shape (B, {g}*{kk}, H, W), got {_shape(x)}"
                )
            b, h, w = x.shape[0], x.shape[2], x.shape[3]
            y = _normalise(x.reshape(b, g, kk, h, w)).reshape(b, g * kk, h, w)
            return self._scale(y, [1, -1, 1, 1])
        if x.numel() != x.shape[0] * g * kk:
            raise ValueError(
                f"FilterNorm(channel): input must hold B*{g}*{kk} values (shape (B, {g * kk}[, 1, 1])), "
                f"got {_shape(x)}"
            )
        b = x.shape[0]
        y = _normalise(x.reshape(b, g, kk)).reshape(b, g * kk)
        return self._scale(y, [1, -1])

    def _scale(self, y: torch.Tensor, view: List[int]) -> torch.Tensor:
        # isinstance (not running_std) so that TorchScript compiles only the branch of this instance's type
        if isinstance(self.std, torch.Tensor):
            return y * self.std.view(view)
        return y * self.std

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, kernel_size={self.kernel_size}, filter_type={self.filter_type!r}, "
                f"nonlinearity={self.nonlinearity!r}, running_std={self.running_std}")


def _spatial_norm(norm: str, head: int, kernel_size: int, nonlinearity: str) -> nn.Module:
    if norm == "filter_norm":
        return FilterNorm(head, kernel_size, "spatial", nonlinearity)
    if norm == "batch_norm":
        return nn.BatchNorm2d(head * kernel_size ** 2)
    return nn.Sigmoid()


def _channel_norm(norm: str, in_channels: int, kernel_size: int, nonlinearity: str) -> nn.Module:
    if norm == "filter_norm":
        return FilterNorm(in_channels, kernel_size, "channel", nonlinearity, running_std=True)
    if norm == "batch_norm":
        # BatchNorm over the channel filters of the batch (needs batch size > 1 in training).
        return nn.BatchNorm2d(in_channels * kernel_size ** 2)
    return nn.Sigmoid()


@torch.jit.unused
def _eager_switches() -> Tuple[bool, bool]:
    return _FUSE_SPATIAL_NORM, _FAST_CHANNEL_BRANCH


def _switches() -> Tuple[bool, bool]:
    """``(_FUSE_SPATIAL_NORM, _FAST_CHANNEL_BRANCH)``, read at every call in eager mode; TorchScript: both on."""
    if torch.jit.is_scripting():
        return True, True
    return _eager_switches()


class SpatialBranch(nn.Sequential):
    """The spatial branch: ``[depthwise conv] -> 1x1 conv to head*k*k -> normalisation`` (an ``nn.Sequential``, so
    its state-dict keys are the original release's), plus :meth:`filter_and_gain` for the fused FilterNorm."""

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        last = layers[-1]
        #: gain of a fixed-scale FilterNorm at the end (applied inside the op when fused), 0.0 otherwise
        self.fusable_gain = float(last.std) if isinstance(last, FilterNorm) and not last.running_std else 0.0

    def filter_and_gain(self, x: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """``(raw filter, gain)`` when the branch ends in a fixed-scale FilterNorm and fusion is on (the op then
        normalises: ``ddf(..., spatial_norm=True, spatial_gain=gain)``); otherwise ``(finished filter, 0.0)``."""
        fuse = _switches()[0] and self.fusable_gain > 0.0
        n = len(self)
        for i, layer in enumerate(self):
            if not fuse or i < n - 1:
                x = layer(x)
        return x, (self.fusable_gain if fuse else 0.0)


@torch.jit.unused
def _ddf_eager(x: torch.Tensor, channel_filter: torch.Tensor, spatial_filter: torch.Tensor, kernel_size: int,
               dilation: int, stride: int, head: int, combine: int, spatial_norm: bool,
               spatial_gain: float) -> torch.Tensor:
    return ddf(x, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
               spatial_norm=spatial_norm, spatial_gain=spatial_gain)


def _apply_ddf(x: torch.Tensor, channel_filter: torch.Tensor, spatial_filter: torch.Tensor, kernel_size: int,
               dilation: int, stride: int, head: int, combine: int, gain: float) -> torch.Tensor:
    """The op with the modules' filters; ``gain > 0`` = fused spatial FilterNorm with that gain. Eager calls go
    through :func:`ddf.ddf` (its checks); TorchScript calls the op, whose body runs the same checks."""
    if channel_filter.dtype != x.dtype:  # e.g. BatchNorm kept in float32 under autocast
        channel_filter = channel_filter.to(x.dtype)
    if spatial_filter.dtype != x.dtype:
        spatial_filter = spatial_filter.to(x.dtype)
    norm = gain > 0.0
    norm_gain = gain if norm else 1.0
    if torch.jit.is_scripting():
        return torch.ops.ddf.ddf_forward(x, channel_filter, spatial_filter, kernel_size, dilation, stride, head,
                                         combine, norm, norm_gain)
    return _ddf_eager(x, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine, norm,
                      norm_gain)


class PointwiseConv2d(nn.Conv2d):
    """The spatial branch's 1x1 convolution ``C -> head*k*k`` (an ``nn.Conv2d``: same parameters, state-dict keys and
    initialisation). On contiguous NCHW CPU tensors it runs as one batched GEMM, ``baddbmm(bias, W, x[b] as (C, H*W))``
    (the input subsampled first at stride > 1): oneDNN's NCHW path for so few output channels reorders to blocked
    formats and was 2.5-5x slower forward+backward (8x64x56x56: 6.2 -> 1.4 ms; stride 2, 8x128x56x56: 14 -> 3 ms).
    Other layouts and devices, and torch.compile, run the convolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile the convolution is traced instead: inductor cannot order the strides of the GEMM's
        # reshaped output when H and W are symbolic (torch.compile(dynamic=True) failed on the DDF-ResNets).
        if x.is_cpu and x.dim() == 4 and x.is_contiguous() and not torch.compiler.is_compiling():
            return _pointwise_nchw(x, self.weight, self.bias, self.stride[0], self.stride[1])
        return self._conv_forward(x, self.weight, self.bias)


def _pointwise_nchw(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], sh: int,
                    sw: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=(sh, sw))`` of a 1x1 weight ``(O, C, 1, 1)`` on NCHW ``x`` as a batched GEMM."""
    if sh > 1 or sw > 1:
        x = x[:, :, ::sh, ::sw]
    b, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    o = weight.shape[0]
    wt = weight.reshape(1, o, c).expand(b, o, c)
    xs = x.reshape(b, c, h * w)
    if bias is None:
        return torch.bmm(wt, xs).view(b, o, h, w)
    return torch.baddbmm(bias.view(1, o, 1).expand(b, o, h * w), wt, xs).view(b, o, h, w)


def build_spatial_branch(in_channels: int, kernel_size: int, head: int = 1, stride: int = 1,
                         nonlinearity: str = "relu", norm: str = "filter_norm",
                         dw_kernel_size: int = 1) -> SpatialBranch:
    """[depthwise conv (dw_kernel_size > 1)] -> 1x1 conv to head*k*k -> normalisation."""
    layers = []
    if dw_kernel_size > 1:
        layers.append(nn.Conv2d(in_channels, in_channels, dw_kernel_size, stride=stride,
                                padding=dw_kernel_size // 2, groups=in_channels))
        stride = 1
    layers.append(PointwiseConv2d(in_channels, head * kernel_size ** 2, stride))
    layers.append(_spatial_norm(norm, head, kernel_size, nonlinearity))
    return SpatialBranch(*layers)


class ChannelBranch(nn.Sequential):
    """The channel branch: ``GAP -> 1x1 conv -> ReLU -> 1x1 conv to C*k*k -> normalisation`` (an ``nn.Sequential``:
    the original release's state-dict keys), plus :meth:`channel_filter`; this class runs the layers as built (the
    batch-norm / sigmoid ablations)."""

    def channel_filter(self, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        """The channel filter ``(B, C, k, k)`` predicted from ``x``."""
        return self.forward(x).reshape(x.shape[0], x.shape[1], kernel_size, kernel_size)


class FilterNormChannelBranch(ChannelBranch):
    """The paper's channel branch (FilterNorm with a learnable scale at its end), run as a few small ops on
    ``(B, C)`` matrices: the 1x1 convs of a 1x1 map are ``linear`` (no convolution primitive to set up, none of its
    memory-format cases), and the FilterNorm and its scale follow on the ``(B, C, k*k)`` view. Same parameters and
    math as running the layers (``ddf.modules._FAST_CHANNEL_BRANCH = False`` does that; tests compare both)."""

    def channel_filter(self, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        if not _switches()[1]:
            return self.forward(x).reshape(b, c, kernel_size, kernel_size)
        conv1, conv2, norm = self[1], self[3], self[4]
        g = F.relu(F.linear(x.mean([2, 3]), conv1.weight.flatten(1), conv1.bias))
        kk = kernel_size * kernel_size
        y = _normalise(F.linear(g, conv2.weight.flatten(1), conv2.bias).view(b, c, kk))
        return norm._scale(y.view(b, c * kk), [1, -1]).view(b, c, kernel_size, kernel_size)


def build_channel_branch(in_channels: int, kernel_size: int, se_ratio: float = 0.2,
                         nonlinearity: str = "relu", norm: str = "filter_norm") -> ChannelBranch:
    """GAP -> 1x1 conv to int(C*se_ratio) -> ReLU -> 1x1 conv to C*k*k -> normalisation."""
    mid = int(in_channels * se_ratio)
    cls = FilterNormChannelBranch if norm == "filter_norm" else ChannelBranch
    return cls(
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Conv2d(in_channels, mid, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, in_channels * kernel_size ** 2, 1),
        _channel_norm(norm, in_channels, kernel_size, nonlinearity),
    )


@_notrace
class DDFPack(nn.Module):
    """DDF module (paper Fig. 2b): predicts spatial and channel filters from ``x`` and applies DDF.

    Args:
        in_channels: channels ``C`` of the input (= output channels).
        kernel_size: odd filter size ``k``.
        stride, dilation: of the DDF operation (the spatial branch's 1x1 conv uses the same stride).
        head: number of spatial-filter heads (must divide ``C``).
        se_ratio: squeeze ratio sigma of the channel branch (``int(C*sigma)`` hidden channels).
        nonlinearity: nonlinearity that follows; sets the FilterNorm scale ``gain/k``.
        kernel_combine: ``'mul'`` or ``'add'``.
        filters: ``'both'`` (DDF), ``'spatial'`` (spatial-only: channel filter is a constant 1 for
            'mul' / 0 for 'add') or ``'channel'`` (channel-only: constant spatial filter). The
            disabled branch creates no parameters. Paper Table 3(a).
        normalization: ``'filter_norm'`` (paper), ``'batch_norm'`` or ``'sigmoid'``. Table 3(b).
    """

    def __init__(self, in_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 head: int = 1, se_ratio: float = 0.2, nonlinearity: str = "relu",
                 kernel_combine: str = "mul", filters: str = "both", normalization: str = "filter_norm"):
        super().__init__()
        owner = "DDFPack"
        self.in_channels = _check_int(owner, "in_channels", in_channels, 1)
        self.kernel_size = _check_int(owner, "kernel_size", kernel_size, 3, odd=True)
        self.stride = _check_int(owner, "stride", stride, 1)
        self.dilation = _check_int(owner, "dilation", dilation, 1)
        self.head = _check_int(owner, "head", head, 1)
        if self.in_channels % self.head != 0:
            raise ValueError(f"{owner}: head={self.head} must divide in_channels={self.in_channels}")
        self.kernel_combine = _check_choice(owner, "kernel_combine", kernel_combine, _COMBINES)
        self._combine = _combine_code(self.kernel_combine)
        self.filters = _check_choice(owner, "filters", filters, _FILTERS)
        self.normalization = _check_choice(owner, "normalization", normalization, _NORMS)
        _check_choice(owner, "nonlinearity", nonlinearity, _NONLINEARITIES)
        self.se_ratio = se_ratio
        if self.filters in ("both", "spatial"):
            self.spatial_branch = build_spatial_branch(
                self.in_channels, self.kernel_size, self.head, self.stride, nonlinearity, self.normalization)
        else:
            self.spatial_branch = None
        if self.filters in ("both", "channel"):
            self.se_ratio = _check_se_ratio(owner, self.in_channels, se_ratio)
            self.channel_branch = build_channel_branch(
                self.in_channels, self.kernel_size, self.se_ratio, nonlinearity, self.normalization)
        else:
            self.channel_branch = None

    def _constant(self, shape: List[int], like: torch.Tensor) -> torch.Tensor:
        fill = 1.0 if self._combine == 0 else 0.0
        return torch.full(shape, fill, dtype=like.dtype, device=like.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DDFPack: input must have shape (B, {self.in_channels}, H, W), got {_shape(x)}")
        b, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        k = self.kernel_size
        if self.channel_branch is not None:
            channel_filter = self.channel_branch.channel_filter(x, k)
        else:
            channel_filter = self._constant([b, c, k, k], x)
        gain = 0.0
        if self.spatial_branch is not None:
            spatial_filter, gain = self.spatial_branch.filter_and_gain(x)
        else:
            ho, wo = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1
            spatial_filter = self._constant([b, self.head * k * k, ho, wo], x)
        return _apply_ddf(x, channel_filter, spatial_filter, k, self.dilation, self.stride, self.head,
                          self._combine, gain)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, head={self.head}, kernel_combine={self.kernel_combine!r}, "
                f"filters={self.filters!r}, normalization={self.normalization!r}")


@_notrace
class DDFUpPack(nn.Module):
    """DDF-Up (paper Fig. 5, Sec. 6): ``scale_factor**2`` DDF branches, pixel-shuffled.

    * Typical upsampling (``joint_channels=-1``): each branch predicts its spatial filters from
      ``x`` through a depthwise ``dw_kernel_size`` conv and a 1x1 conv; ``forward(x)``.
    * Joint upsampling (``joint_channels > 0``): spatial filters are predicted by a 1x1 conv from
      the guidance ``joint_x`` of shape ``(B, joint_channels, H, W)`` (same spatial size as ``x``;
      ``dw_kernel_size`` is unused); ``forward(x, joint_x)``.

    Channel filters are always predicted from ``x``. Output: ``(B, C, H*scale, W*scale)``;
    branch ``i*scale + j`` fills the sub-pixel position ``(i, j)``.
    """

    def __init__(self, in_channels: int, kernel_size: int = 3, scale_factor: int = 2, dilation: int = 1,
                 head: int = 1, se_ratio: float = 0.2, nonlinearity: str = "linear", dw_kernel_size: int = 3,
                 joint_channels: int = -1, kernel_combine: str = "mul"):
        super().__init__()
        owner = "DDFUpPack"
        self.in_channels = _check_int(owner, "in_channels", in_channels, 1)
        self.kernel_size = _check_int(owner, "kernel_size", kernel_size, 3, odd=True)
        self.scale_factor = _check_int(owner, "scale_factor", scale_factor, 2)
        self.dilation = _check_int(owner, "dilation", dilation, 1)
        self.head = _check_int(owner, "head", head, 1)
        if self.in_channels % self.head != 0:
            raise ValueError(f"{owner}: head={self.head} must divide in_channels={self.in_channels}")
        self.dw_kernel_size = _check_int(owner, "dw_kernel_size", dw_kernel_size, 1, odd=True)
        if isinstance(joint_channels, bool) or not isinstance(joint_channels, numbers.Integral):
            raise TypeError(f"{owner}: joint_channels must be an integer (-1 for typical upsampling), "
                            f"got {joint_channels!r}")
        if joint_channels != -1 and joint_channels < 1:
            raise ValueError(f"{owner}: joint_channels must be -1 (typical upsampling) or >= 1, "
                             f"got {joint_channels}")
        self.joint_channels = int(joint_channels)
        self.kernel_combine = _check_choice(owner, "kernel_combine", kernel_combine, _COMBINES)
        self._combine = _combine_code(self.kernel_combine)
        _check_choice(owner, "nonlinearity", nonlinearity, _NONLINEARITIES)
        se_ratio = _check_se_ratio(owner, self.in_channels, se_ratio)
        guide_channels = self.joint_channels if self.joint else self.in_channels
        n = self.scale_factor ** 2
        # typical upsampling: guidance computed from x by a depthwise conv (paper Sec. 6);
        # joint upsampling: the guidance features are used directly (1x1 conv only, as the original)
        dw = 1 if self.joint else self.dw_kernel_size
        self.spatial_branch = nn.ModuleList(
            build_spatial_branch(guide_channels, self.kernel_size, self.head, 1, nonlinearity,
                                 "filter_norm", dw) for _ in range(n))
        self.channel_branch = nn.ModuleList(
            build_channel_branch(self.in_channels, self.kernel_size, se_ratio, nonlinearity, "filter_norm")
            for _ in range(n))

    @property
    def joint(self) -> bool:
        return self.joint_channels > 0

    def forward(self, x: torch.Tensor, joint_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DDFUpPack: x must have shape (B, {self.in_channels}, H, W), got {_shape(x)}")
        b, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        guide = self._guide(x, joint_x)
        k = self.kernel_size
        outs: List[torch.Tensor] = []
        for s_b, c_b in zip(self.spatial_branch, self.channel_branch):
            channel_filter = c_b.channel_filter(x, k)
            spatial_filter, gain = s_b.filter_and_gain(guide)
            outs.append(_apply_ddf(x, channel_filter, spatial_filter, k, self.dilation, 1, self.head,
                                   self._combine, gain))
        out = torch.stack(outs, dim=2).reshape(b, c * self.scale_factor * self.scale_factor, h, w)
        return F.pixel_shuffle(out, self.scale_factor)

    def _guide(self, x: torch.Tensor, joint_x: Optional[torch.Tensor]) -> torch.Tensor:
        """The features the spatial filters are predicted from: ``joint_x`` (joint upsampling) or ``x``."""
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
        if self.joint_channels > 0:
            if joint_x is None:
                raise ValueError(
                    f"DDFUpPack: built for joint upsampling (joint_channels={self.joint_channels}); "
                    f"forward needs joint_x of shape (B, {self.joint_channels}, {h}, {w})")
            if joint_x.dim() != 4 or list(joint_x.shape) != [b, self.joint_channels, h, w]:
                raise ValueError(
                    f"DDFUpPack: joint_x must have shape (B, joint_channels, H, W) = "
                    f"({b}, {self.joint_channels}, {h}, {w}), got {_shape(joint_x)}")
            return joint_x
        if joint_x is not None:
            raise ValueError(
                "DDFUpPack: joint_x given but the module was built for typical upsampling "
                "(joint_channels=-1); build it with joint_channels=<guidance channels>")
        return x

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, kernel_size={self.kernel_size}, scale_factor={self.scale_factor}, "
                f"dilation={self.dilation}, head={self.head}, joint_channels={self.joint_channels}, "
                f"kernel_combine={self.kernel_combine!r}")
