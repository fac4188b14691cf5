"""DDF-ResNets (paper Sec. 5, Fig. 4), registered with timm.

timm's ``ResNet`` is used as a library: the blocks below subclass timm's ``Bottleneck`` /
``BasicBlock`` and swap their 3x3 convolutions for :class:`ddf.DDFPack`; the stem, the 1x1
convs, the shortcuts and the classifier are timm's, unchanged.

Which convs become DDF
----------------------
* Bottleneck (R50/101/152): ``conv2`` (the only 3x3 conv), strided where the block strides.
  This is the original design; its state-dict keys equal the released checkpoints'.
* BasicBlock (R18/34, tiny): ``conv2`` always (planes -> planes), and ``conv1`` whenever it keeps
  the channel count (every block except the first block of stages 2-4). A DDF cannot change the
  channel count, so ``conv1`` of a downsampling block (C -> 2C, stride 2) stays a standard 3x3
  conv. See README.md, section 'DDF modules and DDF-ResNets' for the resulting size beside the paper's DDF-R18.

Ablations (paper Table 3) are kwargs of every model: ``filters='both'|'spatial'|'channel'``,
``normalization='filter_norm'|'batch_norm'|'sigmoid'``, ``se_ratio=0.2``.
"""
from __future__ import annotations

from typing import Any, Dict

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..modules import DDFPack
from ..state_dict import unwrap_state_dict

__all__ = ["DDFBottleneck", "DDFBasicBlock", "DDF_BLOCK_KWARGS"]

# kwargs of create_model() that configure the DDF modules (routed into ResNet's block_args)
DDF_BLOCK_KWARGS = ("se_ratio", "kernel_combine", "filters", "normalization", "head", "nonlinearity")


def _to(module: nn.Module, device=None, dtype=None) -> nn.Module:
    if device is not None or dtype is not None:
        module = module.to(device=device, dtype=dtype)
    return module


class DDFBottleneck(Bottleneck):
    """timm Bottleneck with its 3x3 ``conv2`` replaced by a DDFPack (paper Fig. 4)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=64,
                 reduce_first=1, dilation=1, first_dilation=None, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, attn_layer=None, aa_layer=None, drop_block=None,
                 drop_path=None, se_ratio=0.2, kernel_combine="mul", filters="both",
                 normalization="filter_norm", head=1, nonlinearity="relu", **kwargs):
        if cardinality != 1 or reduce_first != 1:
            raise ValueError(
                f"DDFBottleneck: cardinality and reduce_first must be 1 (a DDF keeps the channel count), "
                f"got cardinality={cardinality}, reduce_first={reduce_first}")
        super().__init__(inplanes, planes, stride=stride, downsample=downsample, cardinality=cardinality,
                         base_width=base_width, reduce_first=reduce_first, dilation=dilation,
                         first_dilation=first_dilation, act_layer=act_layer, norm_layer=norm_layer,
                         attn_layer=attn_layer, aa_layer=aa_layer, drop_block=drop_block,
                         drop_path=drop_path, **kwargs)
        width = self.conv2.out_channels
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)
        self.conv2 = _to(DDFPack(width, kernel_size=3, stride=1 if use_aa else stride, dilation=first_dilation,
                                 head=head, se_ratio=se_ratio, nonlinearity=nonlinearity,
                                 kernel_combine=kernel_combine, filters=filters, normalization=normalization),
                         kwargs.get("device"), kwargs.get("dtype"))


class DDFBasicBlock(BasicBlock):
    """timm BasicBlock with every channel-preserving 3x3 conv replaced by a DDFPack.

    ``conv2`` is always a DDF; ``conv1`` is a DDF unless it changes the channel count
    (first block of a stage that widens), where it stays timm's strided 3x3 conv.
    """

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=64,
                 reduce_first=1, dilation=1, first_dilation=None, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, attn_layer=None, aa_layer=None, drop_block=None,
                 drop_path=None, se_ratio=0.2, kernel_combine="mul", filters="both",
                 normalization="filter_norm", head=1, nonlinearity="relu", **kwargs):
        super().__init__(inplanes, planes, stride=stride, downsample=downsample, cardinality=cardinality,
                         base_width=base_width, reduce_first=reduce_first, dilation=dilation,
                         first_dilation=first_dilation, act_layer=act_layer, norm_layer=norm_layer,
                         attn_layer=attn_layer, aa_layer=aa_layer, drop_block=drop_block,
                         drop_path=drop_path, **kwargs)
        dd = (kwargs.get("device"), kwargs.get("dtype"))
        ddf_args = dict(kernel_size=3, head=head, se_ratio=se_ratio, nonlinearity=nonlinearity,
                        kernel_combine=kernel_combine, filters=filters, normalization=normalization)
        first_planes = self.conv1.out_channels
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)
        if inplanes == first_planes:
            self.conv1 = _to(DDFPack(inplanes, stride=1 if use_aa else stride, dilation=first_dilation,
                                     **ddf_args), *dd)
        if self.conv2.in_channels == self.conv2.out_channels:
            self.conv2 = _to(DDFPack(self.conv2.in_channels, stride=1, dilation=dilation, **ddf_args), *dd)


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    """Evaluation settings of the original release (timm 0.4.5 ResNet cfg with bicubic resize)."""
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc",
        "origin_url": "https://github.com/theFoxofSky/ddfnet", "paper_ids": "arXiv:2104.14107",
        "paper_name": "Decoupled Dynamic Filter Networks",
        **kwargs,
    }


_RELEASED = ("Released weights (not downloadable automatically): Google Drive / Baidu (code vub3) links "
             "in https://github.com/theFoxofSky/ddfnet README; load with "
             "pretrained_cfg_overlay=dict(file=PATH) or checkpoint_path=PATH.")

default_cfgs = generate_default_cfgs({
    "ddf_mul_resnet18": _cfg(),
    "ddf_mul_resnet34": _cfg(),
    "ddf_mul_resnet50": _cfg(notes=(_RELEASED,)),
    "ddf_mul_resnet101": _cfg(notes=(_RELEASED,)),
    "ddf_mul_resnet152": _cfg(),
    "ddf_add_resnet18": _cfg(),
    "ddf_add_resnet34": _cfg(),
    "ddf_add_resnet50": _cfg(notes=(_RELEASED,)),
    "ddf_add_resnet101": _cfg(notes=(_RELEASED,)),
    "ddf_add_resnet152": _cfg(),
    # small demo nets for CPU training on 32-64 px images
    # (deep stem: the first conv is conv1.0, which timm adapts for in_chans != 3 when loading weights)
    "ddf_mul_resnet_tiny": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0, first_conv="conv1.0"),
    "ddf_add_resnet_tiny": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0, first_conv="conv1.0"),
})


def _unwrap_state_dict(state_dict, model=None):
    """timm's pretrained filter: the weights of a raw state dict or a training checkpoint (ddf.state_dict)."""
    return unwrap_state_dict(state_dict)


def _has_weights_source(kwargs) -> bool:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = kwargs.get("pretrained_cfg")
    sources = [overlay.get(k) for k in ("file", "url", "state_dict", "hf_hub_id")]
    if cfg is not None:
        get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
        sources += [get(k) for k in ("file", "url", "state_dict", "hf_hub_id")]
    return any(bool(s) for s in sources)


def _create_ddf_resnet(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    if pretrained and not _has_weights_source(kwargs):
        raise ValueError(
            f"{variant}: the released weights cannot be downloaded automatically. Download them "
            "(links in README.md, section 'DDF modules and DDF-ResNets') and pass pretrained_cfg_overlay=dict(file=PATH) together with "
            "pretrained=True, or use checkpoint_path=PATH.")
    block_args = dict(kwargs.pop("block_args", None) or {})
    for key in DDF_BLOCK_KWARGS:
        if key in kwargs:
            block_args[key] = kwargs.pop(key)
    kwargs["block_args"] = block_args
    return build_model_with_cfg(ResNet, variant, pretrained, pretrained_filter_fn=_unwrap_state_dict, **kwargs)


def _args(block, layers, combine, **extra):
    return dict(block=block, layers=layers, block_args=dict(kernel_combine=combine), **extra)


def _make(variant: str, model_args: Dict[str, Any], pretrained: bool, kwargs: Dict[str, Any]) -> ResNet:
    block_args = dict(model_args.pop("block_args"))
    block_args.update(kwargs.pop("block_args", None) or {})
    merged = {**model_args, **kwargs}
    merged["block_args"] = block_args
    return _create_ddf_resnet(variant, pretrained, **merged)


# deep stem 3->16->16->32 so that layer1 starts at 32 channels (timm's plain stem always gives 64)
_TINY = dict(channels=(32, 64, 128, 256), stem_type="deep", stem_width=16)


@register_model
def ddf_mul_resnet18(pretrained=False, **kwargs) -> ResNet:
    """DDF-ResNet-18, 'mul' combination."""
    return _make("ddf_mul_resnet18", _args(DDFBasicBlock, (2, 2, 2, 2), "mul"), pretrained, kwargs)


@register_model
def ddf_mul_resnet34(pretrained=False, **kwargs) -> ResNet:
    """DDF-ResNet-34, 'mul' combination."""
    return _make("ddf_mul_resnet34", _args(DDFBasicBlock, (3, 4, 6, 3), "mul"), pretrained, kwargs)


@register_model
def ddf_mul_resnet50(pretrained=False, **kwargs) -> ResNet:
    """DDF-ResNet-50, 'mul' combination (paper: 16.8M params, 2.3 GFLOPs, 79.1 top-1)."""
    return _make("ddf_mul_resnet50", _args(DDFBottleneck, (3, 4, 6, 3), "mul"), pretrained, kwargs)


@register_model
def ddf_mul_resnet101(pretrained=False, **kwargs) -> ResNet:
    """DDF-ResNet-101, 'mul' combination (paper: 28.1M params, 4.1 GFLOPs, 80.2 top-1)."""
    return _make("ddf_mul_resnet101", _args(DDFBottleneck, (3, 4, 23, 3), "mul"), pretrained, kwargs)


@register_model
def ddf_mul_resnet152(pretrained=False, **kwargs) -> ResNet:
    """DDF-ResNet-152, 'mul' combination."""
    return _make("ddf_mul_resnet152", _args(DDFBottleneck, (3, 8, 36, 3), "mul"), pretrained, kwargs)


@register_model
def ddf_add_resnet18(pretrained=False, **kwargs) -> ResNet:
    """DDF-ResNet-18, 'add' combination."""
    return _make("ddf_add_resnet18", _args(DDFBasicBlock, (2, 2, 2, 2), "add"), pretrained, kwargs)


@register_model
def ddf_add_resnet34(pretrained=False, **kwargs) -> ResNet:
    """DDF-ResNet-34, 'add' combination."""
    return _make("ddf_add_resnet34", _args(DDFBasicBlock, (3, 4, 6, 3), "add"), pretrained, kwargs)


@register_model
def ddf_add_resnet50(pretrained=False, **kwargs) -> ResNet:
    """DDF-ResNet-50, 'add' combination."""
    return _make("ddf_add_resnet50", _args(DDFBottleneck, (3, 4, 6, 3), "add"), pretrained, kwargs)


@register_model
def ddf_add_resnet101(pretrained=False, **kwargs) -> ResNet:
    """DDF-ResNet-101, 'add' combination."""
    return _make("ddf_add_resnet101", _args(DDFBottleneck, (3, 4, 23, 3), "add"), pretrained, kwargs)


@register_model
def ddf_add_resnet152(pretrained=False, **kwargs) -> ResNet:
    """DDF-ResNet-152, 'add' combination."""
    return _make("ddf_add_resnet152", _args(DDFBottleneck, (3, 8, 36, 3), "add"), pretrained, kwargs)


@register_model
def ddf_mul_resnet_tiny(pretrained=False, **kwargs) -> ResNet:
    """Small DDF-ResNet for CPU demos: BasicBlock, layers (1,1,1,1), channels (32,64,128,256)."""
    return _make("ddf_mul_resnet_tiny", _args(DDFBasicBlock, (1, 1, 1, 1), "mul", **_TINY), pretrained, kwargs)


@register_model
def ddf_add_resnet_tiny(pretrained=False, **kwargs) -> ResNet:
    """Small DDF-ResNet for CPU demos, 'add' combination."""
    return _make("ddf_add_resnet_tiny", _args(DDFBasicBlock, (1, 1, 1, 1), "add", **_TINY), pretrained, kwargs)
