"""``ddf.convert``: replace the eligible k x k convolutions of any ``nn.Module`` by DDF layers.

    model, report = ddf.convert(timm.create_model("regnetx_008"))
    print(report)             # which layers, params and FLOPs before/after

What is replaced
----------------
Every ``nn.Conv2d`` (subclasses included: timm's ``Conv2dSame``, ``StdConv2d`` ... and what ``create_conv2d``
builds) whose geometry a DDF can take over with the same output shape:

* square kernel, odd ``k >= 3``; square stride 1 or 2; square dilation; ``padding_mode='zeros'``;
* padding ``k//2 * dilation`` on both sides, ``padding='same'``, or timm's dynamic same-padding (``Conv2dSame``,
  ``*Same`` with ``same_pad``; a DDF pads ``k//2 * dilation`` symmetrically, so where TF-'SAME' pads one extra
  row/column at the end (even input, stride 2) the output shape is the same and the sampling grid shifts by one
  pixel);
* ``in_channels == out_channels``, any ``groups`` (dense, grouped as in ResNeXt/RegNet, depthwise): a DDF mixes no
  channels, so a grouped conv is as replaceable as a dense one;
* the DDF options fit the layer (``head`` divides the channels, ``int(C * se_ratio) >= 1``).

It becomes a :class:`ddf.DDFPack` with the conv's ``kernel_size``, ``stride`` and ``dilation`` (and a conv with a
bias becomes :class:`DDFPackBias`, a DDFPack plus that per-channel bias, its values kept), on the conv's device and
dtype and in its train/eval mode. The conv's weights are dropped (a DDF has none of that shape); everything else
in the model, its weights, ``forward_features`` and ``feature_info`` is untouched.

Choosing layers: ``include`` / ``exclude`` (a predicate ``f(name, conv) -> bool``, an ``fnmatch`` pattern or a list
of patterns on the qualified name, e.g. ``"layer[34].*"``), ``min_channels``, and ``policy="paper"``: the layout of
our DDF-ResNets (``ddf_mul_resnet*``) for timm ResNets, i.e. the eligible 3x3 convs inside the residual stages
``layer1``-``layer4`` (every bottleneck ``conv2``; in basic blocks ``conv2`` and the channel-keeping ``conv1``),
never the stem. (The paper and our ``ddf_mul_resnet50`` use DDF in every stage, not only the last ones; to limit
the stages, add ``include="layer[34].*"``.)

The model is converted **in place** and returned (``inplace=False`` converts a deep copy instead); a model that
holds no eligible conv comes back unchanged, with a report saying so. Only when the model itself is an eligible
conv is a new object (the DDF layer) returned.
"""
from __future__ import annotations

import copy
import fnmatch
import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import flops as _flops
from ._checks import COMBINES
from ._checks import check_choice as _check_choice
from ._checks import check_int as _check_int
from .modules import _FILTERS, _NONLINEARITIES, _NORMS, DDFPack, _notrace

__all__ = ["convert", "ConvertReport", "DDFPackBias", "POLICIES"]

_OWNER = "ddf.convert"
#: ``policy`` values: None (every eligible conv) or "paper" (timm ResNets: the residual stages, as ddf_*_resnet*)
POLICIES = (None, "paper")
_PAPER_STAGES = ("layer1", "layer2", "layer3", "layer4")


@_notrace
class DDFPackBias(DDFPack):
    """A :class:`DDFPack` followed by a learnable per-channel bias (the replaced conv's bias, copied)."""

    def __init__(self, in_channels: int, *args, bias: Optional[torch.Tensor] = None, **kwargs):
        super().__init__(in_channels, *args, **kwargs)
        init = torch.zeros(in_channels) if bias is None else bias.detach().clone().reshape(in_channels)
        self.bias = nn.Parameter(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + self.bias.to(out.dtype).view(1, -1, 1, 1)


@dataclass
class ConvertReport:
    """What :func:`convert` did. FLOPs follow the paper's convention (:func:`ddf.flops.paper_flops`: conv/linear
    multiply-adds + ``3nck^2`` per DDF op) for one ``(1, *input_size)`` input, counted on the meta device; ``None``
    with the reason in ``flops_note`` when the model cannot run on meta tensors or counting was switched off."""

    replaced: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # k x k convs (k > 1) left as they were -> why
    params_before: int = 0
    params_after: int = 0
    flops_before: Optional[int] = None
    flops_after: Optional[int] = None
    input_size: Optional[Tuple[int, ...]] = None
    flops_note: str = ""

    @property
    def count(self) -> int:
        return len(self.replaced)

    @property
    def changed(self) -> bool:
        return bool(self.replaced)

    def __str__(self) -> str:
        if not self.replaced:
            head = f"{_OWNER}: nothing eligible, model unchanged ({len(self.skipped)} k x k convs looked at)"
        else:
            head = f"{_OWNER}: replaced {self.count} convs by DDF layers"
        lines = [head, f"  params: {self.params_before:,} -> {self.params_after:,}"]
        if self.flops_before is not None and self.flops_after is not None:
            lines.append(f"  FLOPs (paper convention, input 1x{'x'.join(map(str, self.input_size))}): "
                         f"{self.flops_before:,} -> {self.flops_after:,}")
        if self.flops_note:
            lines.append(f"  {self.flops_note}")
        lines += [f"  replaced {name}" for name in self.replaced]
        lines += [f"  kept {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _same_padded(conv: nn.Conv2d) -> bool:
    """timm's dynamic 'SAME' padding (Conv2dSame, Conv2dSameExport, StdConv2dSame, ScaledStdConv2dSame)."""
    if getattr(conv, "same_pad", False) is True:
        return True
    try:  # lazily: only to recognise timm's classes
        from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    except ImportError:
        return False
    return isinstance(conv, (Conv2dSame, Conv2dSameExport))


def _geometry_problem(conv: nn.Conv2d) -> Optional[str]:
    """Why a DDF cannot take over ``conv`` with the same output shape, or None."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if kh != kw or kh < 3 or kh % 2 == 0:
        return f"kernel {kh}x{kw} (a DDF needs a square odd kernel >= 3)"
    if conv.in_channels != conv.out_channels:
        return f"in_channels={conv.in_channels} != out_channels={conv.out_channels} (a DDF keeps the channel count)"
    if sh != sw or sh not in (1, 2):
        return f"stride {sh}x{sw} (1 or 2 only)"
    if dh != dw:
        return f"dilation {dh}x{dw} (square only)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (a DDF zero-pads)"
    if conv.padding == "same" or _same_padded(conv):
        return None
    if tuple(conv.padding) != (kh // 2 * dh,) * 2:
        return f"padding {conv.padding} (a DDF pads k//2*dilation = {kh // 2 * dh})"
    return None


def _options_problem(channels: int, options: Dict) -> Optional[str]:
    if channels % options["head"] != 0:
        return f"head={options['head']} does not divide {channels} channels"
    if options["filters"] != "spatial" and int(channels * options["se_ratio"]) < 1:
        return f"se_ratio={options['se_ratio']} leaves no squeeze channel for {channels} channels"
    return None


def _matcher(option: str, value) -> Optional[Callable[[str, nn.Module], bool]]:
    """``include``/``exclude`` as a predicate: None, a callable, an fnmatch pattern or a list of patterns."""
    if value is None or callable(value):
        return value
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{_OWNER}: {option} must be a callable (name, conv) -> bool, an fnmatch pattern or a list "
                        f"of patterns, got {type(value).__name__} {value!r}")
    return lambda name, conv: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _policy_matcher(model: nn.Module, policy) -> Optional[Callable[[str, nn.Module], bool]]:
    if policy not in POLICIES:
        raise ValueError(f"{_OWNER}: policy must be one of {POLICIES}, got {policy!r}")
    if policy is None:
        return None
    try:
        from timm.models.resnet import ResNet
    except ImportError:
        ResNet = ()
    if not isinstance(model, ResNet):
        raise ValueError(f"{_OWNER}: policy='paper' is the DDF-ResNet layout and is defined for timm ResNets "
                         f"(layer1-layer4), got {type(model).__name__}; choose layers with include=... instead")
    return lambda name, conv: name.split(".", 1)[0] in _PAPER_STAGES


def _check_options(kernel_combine, head, se_ratio, normalization, filters, nonlinearity) -> Dict:
    """The DDFPack options, checked once (one line naming the option)."""
    _check_choice(_OWNER, "kernel_combine", kernel_combine, tuple(COMBINES))
    _check_choice(_OWNER, "normalization", normalization, _NORMS)
    _check_choice(_OWNER, "filters", filters, _FILTERS)
    _check_choice(_OWNER, "nonlinearity", nonlinearity, _NONLINEARITIES)
    if isinstance(se_ratio, bool) or not isinstance(se_ratio, numbers.Real) or not float(se_ratio) > 0:
        raise ValueError(f"{_OWNER}: se_ratio must be a number > 0, got {se_ratio!r}")
    return dict(head=_check_int(_OWNER, "head", head, 1), se_ratio=float(se_ratio), kernel_combine=kernel_combine,
                normalization=normalization, filters=filters, nonlinearity=nonlinearity)


def _ddf_layer(conv: nn.Conv2d, options: Dict) -> DDFPack:
    kwargs = dict(kernel_size=conv.kernel_size[0], stride=conv.stride[0], dilation=conv.dilation[0], **options)
    if conv.bias is not None:
        layer = DDFPackBias(conv.in_channels, bias=conv.bias, **kwargs)
    else:
        layer = DDFPack(conv.in_channels, **kwargs)
    layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
    return layer.train(conv.training)


def _why_kept(name: str, conv: nn.Conv2d, selectors, min_channels: int, options: Dict) -> Optional[str]:
    """Why ``conv`` (qualified ``name``) stays a conv, or None when it is replaced."""
    problem = _geometry_problem(conv)
    if problem is not None:
        return problem
    include, exclude, policy = selectors
    if policy is not None and not policy(name, conv):
        return "outside the residual stages (policy='paper')"
    if include is not None and not include(name, conv):
        return "not matched by include"
    if exclude is not None and exclude(name, conv):
        return "matched by exclude"
    if conv.in_channels < min_channels:
        return f"{conv.in_channels} channels < min_channels={min_channels}"
    return _options_problem(conv.in_channels, options)


def _replace(model: nn.Module, selectors, min_channels: int, options: Dict, report: ConvertReport) -> nn.Module:
    """Swap the chosen convs in place (a conv shared by several parents becomes one shared DDF layer)."""
    built: Dict[int, Optional[nn.Module]] = {}
    slots = [("", None, None, model)] if isinstance(model, nn.Conv2d) else []
    for parent_name, parent in model.named_modules():
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, nn.Conv2d):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                slots.append((name, parent, child_name, child))
    for name, parent, child_name, conv in slots:
        if id(conv) not in built:  # decided once per conv object, under its first name
            why = _why_kept(name, conv, selectors, min_channels, options)
            built[id(conv)] = None if why is not None else _ddf_layer(conv, options)
            if why is None:
                report.replaced.append(name)
            elif conv.kernel_size != (1, 1):
                report.skipped[name] = why
        if built[id(conv)] is None:
            continue
        if parent is None:
            return built[id(conv)]
        setattr(parent, child_name, built[id(conv)])
    return model


def _default_input_size(model: nn.Module) -> Tuple[int, ...]:
    """timm's ``pretrained_cfg['input_size']`` when the model has one, else (first conv's in_channels, 224, 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(n) for n in cfg["input_size"])
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (first.in_channels if first is not None else 3, 224, 224)


def _count(model: nn.Module, input_size, report: ConvertReport) -> Optional[int]:
    if input_size is None or report.flops_note:
        return None
    try:
        split = _flops.model_flops(model, input_size)
    except Exception as e:  # noqa: BLE001  (any model: report why, do not fail the conversion)
        report.flops_note = f"FLOPs not counted: the model does not run on meta tensors ({type(e).__name__}: {e})"
        return None
    if report.replaced and split["ddf"] == 0:  # never a total that leaves the DDF ops out
        report.flops_note = "FLOPs not counted: FlopCounterMode saw no torch.ops.ddf.ddf_forward call"
        return None
    return split["total"]


def convert(model: nn.Module, *, include=None, exclude=None, min_channels: int = 1, policy: Optional[str] = None,
            kernel_combine: str = "mul", head: int = 1, se_ratio: float = 0.2, normalization: str = "filter_norm",
            filters: str = "both", nonlinearity: str = "relu", inplace: bool = True,
            input_size="auto") -> Tuple[nn.Module, ConvertReport]:
    """Replace each eligible k x k conv of ``model`` by a DDF layer; return ``(model, report)``.

    See the module docstring for what is eligible and what is kept. ``include``/``exclude``: predicate
    ``f(name, conv) -> bool``, fnmatch pattern or list of patterns; ``policy``: None or ``"paper"`` (timm ResNets,
    the layout of ``ddf_*_resnet*``); ``kernel_combine``, ``head``, ``se_ratio``, ``normalization``
    (``'filter_norm'`` = the paper's FilterNorm, ``'batch_norm'``, ``'sigmoid'``), ``filters``, ``nonlinearity``:
    the :class:`ddf.DDFPack` options. ``inplace=False`` converts a deep copy. ``input_size``: ``(C, H, W)`` of the
    FLOP count, ``"auto"`` (timm's ``pretrained_cfg`` input size, else ``(C, 224, 224)``) or None (no count).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OWNER}: model must be a torch.nn.Module, got {type(model).__name__}")
    options = _check_options(kernel_combine, head, se_ratio, normalization, filters, nonlinearity)
    selectors = (_matcher("include", include), _matcher("exclude", exclude), _policy_matcher(model, policy))
    min_channels = _check_int(_OWNER, "min_channels", min_channels, 1)
    if not isinstance(inplace, bool):
        raise TypeError(f"{_OWNER}: inplace must be True or False, got {inplace!r}")
    if isinstance(input_size, str) and input_size == "auto":
        input_size = _default_input_size(model)
    elif input_size is not None:
        if not isinstance(input_size, (tuple, list)):
            raise TypeError(f"{_OWNER}: input_size must be (C, H, W), 'auto' or None, got {input_size!r}")
        input_size = tuple(_check_int(_OWNER, "input_size", n, 1) for n in input_size)
    report = ConvertReport(input_size=input_size, params_before=sum(p.numel() for p in model.parameters()))
    if input_size is None:
        report.flops_note = "FLOPs not counted (input_size=None)"
    report.flops_before = _count(model, input_size, report)
    if not inplace:
        model = copy.deepcopy(model)
    model = _replace(model, selectors, min_channels, options, report)
    report.params_after = sum(p.numel() for p in model.parameters())
    report.flops_after = _count(model, input_size, report) if report.replaced else report.flops_before
    return model, report
