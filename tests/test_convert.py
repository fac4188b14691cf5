"""ddf.convert (issue 26 item 1): any nn.Module's eligible k x k convs become DDF layers.

Six timm families are converted and trained one step, reloaded strictly, run channels_last; the paper policy on
timm's ResNets gives our DDF-ResNets' exact layout (state-dict keys and shapes, so the released weights load);
torch.compile(backend="aot_eager") on a converted model; the nothing-eligible and bad-input cases.
"""
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import Conv2dSame, create_conv2d
from timm.models.resnet import BasicBlock, ResNet

import ddf
import models  # noqa: F401  (registers the DDF-ResNets)
from ddf.convert import DDFPackBias
from ddf.flops import model_flops

FAMILIES = ["resnet50", "resnext50_32x4d", "regnetx_008", "efficientnet_b0", "mobilenetv3_large_100",
            "convnext_nano"]


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _ddf_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, ddf.DDFPack))


@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_paper_policy_on_timm_resnet_is_our_ddf_resnet(name):
    """Same DDF layers, state-dict keys and shapes (hence params) as ddf_mul_<name>: its weights load strictly."""
    torch.manual_seed(0)
    converted, report = ddf.convert(timm.create_model(name, pretrained=False), policy="paper")
    ours = timm.create_model(f"ddf_mul_{name}", pretrained=False)
    assert _ddf_names(converted) == _ddf_names(ours) == sorted(report.replaced)
    assert report.count == (16 if name == "resnet50" else 13)
    assert _shapes(converted) == _shapes(ours)
    assert report.params_after == sum(p.numel() for p in ours.parameters())  # 16,843,748 for resnet50
    converted.load_state_dict(ours.state_dict(), strict=True)
    assert report.flops_after == model_flops(ours, (3, 224, 224))["total"]
    assert report.flops_before == model_flops(timm.create_model(name), (3, 224, 224))["total"]
    assert report.flops_after < report.flops_before and report.params_after < report.params_before


def test_paper_policy_keeps_the_stem_of_a_deep_stem_resnet():
    """Deep stem (ddf_mul_resnet_tiny): the 16->16 stem conv is eligible but stays a conv, as in our DDF-ResNet."""
    tiny = dict(layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_type="deep", stem_width=16)
    paper, _ = ddf.convert(ResNet(BasicBlock, **tiny), policy="paper")
    assert _shapes(paper) == _shapes(timm.create_model("ddf_mul_resnet_tiny"))
    everything, report = ddf.convert(ResNet(BasicBlock, **tiny))
    assert "conv1.3" in report.replaced and isinstance(everything.conv1[3], ddf.DDFPack)
    assert "conv1.3" not in _ddf_names(paper)


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_family_converts_trains_reloads_and_runs_channels_last(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    feature_info = model.feature_info
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before, feats_before = model(x).shape, model.forward_features(x).shape
    model.train()
    converted, report = ddf.convert(model, input_size=(3, 64, 64))
    assert converted is model and report.count > 0 and report.flops_after is not None
    assert _ddf_names(model) == sorted(report.replaced)
    assert model.feature_info is feature_info
    out = model(x)  # train mode: forward + backward reaches every DDF layer
    assert out.shape == before
    out.square().mean().backward()
    ddf_params = [p for n in report.replaced for p in model.get_submodule(n).parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ddf_params)
    model.eval()
    with torch.no_grad():
        assert model.forward_features(x).shape == feats_before
        ref = model(x)
        fresh, _ = ddf.convert(timm.create_model(name, pretrained=False), input_size=None)
        fresh.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(fresh.eval()(x), ref)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_convnext_depthwise_conv_bias_is_kept():
    model = timm.create_model("convnext_nano", pretrained=False)
    bias = model.stages[0].blocks[0].conv_dw.bias.detach().clone()
    ddf.convert(model, input_size=None)
    layer = model.stages[0].blocks[0].conv_dw
    assert isinstance(layer, DDFPackBias) and layer.kernel_size == 7
    torch.testing.assert_close(layer.bias.detach(), bias)


def test_torch_compile_aot_eager_on_a_converted_model():
    torch.manual_seed(0)
    model, report = ddf.convert(timm.create_model("resnet18", pretrained=False, num_classes=10), policy="paper")
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_nothing_eligible_returns_the_model_unchanged_with_a_report_saying_so():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1),
                          nn.Conv2d(8, 8, (3, 5), padding=(1, 2)), nn.Conv2d(8, 8, 3, padding=1, stride=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model]
    out, report = ddf.convert(model, input_size=(3, 16, 16))
    assert out is model and [type(m) for m in model] == kinds
    assert not report.changed and report.count == 0 and report.replaced == []
    assert report.params_before == report.params_after and report.flops_before == report.flops_after > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "nothing eligible, model unchanged" in str(report)
    assert set(report.skipped) == {"0", "2", "4", "5"}  # the 1x1 conv is not listed
    assert "in_channels=3 != out_channels=8" in report.skipped["0"] and "padding" in report.skipped["2"]
    assert "kernel 3x5" in report.skipped["4"] and "stride 3x3" in report.skipped["5"]


def test_non_module_is_a_type_error_naming_the_argument():
    with pytest.raises(TypeError, match=r"ddf.convert: model must be a torch.nn.Module, got str"):
        ddf.convert("resnet50")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(include=3), TypeError, "include must be"),
    (dict(exclude=[1]), TypeError, "exclude must be"),
    (dict(kernel_combine="max"), ValueError, "kernel_combine must be one of"),
    (dict(normalization="none"), ValueError, "normalization must be one of"),
    (dict(se_ratio=0), ValueError, "se_ratio must be a number > 0"),
    (dict(head=0), ValueError, "head must be >= 1"),
    (dict(min_channels=0), ValueError, "min_channels must be >= 1"),
    (dict(policy="last"), ValueError, "policy must be one of"),
    (dict(policy="paper"), ValueError, "policy='paper' .* timm ResNets"),
    (dict(input_size=64), TypeError, "input_size must be"),
])
def test_bad_options_are_one_line_naming_the_option(kwargs, error, match):
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(error, match=match):
        ddf.convert(model, **kwargs)
    assert isinstance(model[0], nn.Conv2d)


def _stack():
    return nn.Sequential(nn.Conv2d(4, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 5, padding=4,
                         dilation=2, groups=16, bias=False), nn.Conv2d(16, 16, 3, padding=1, stride=2, groups=4),
                         nn.Conv2d(16, 32, 1), nn.Conv2d(32, 32, 3, padding=1))


def test_layer_choice_by_patterns_predicate_and_min_channels():
    assert ddf.convert(_stack(), include="[12]")[1].replaced == ["1", "2"]
    assert ddf.convert(_stack(), include=["1", "5"], exclude="5")[1].replaced == ["1"]
    assert ddf.convert(_stack(), include=lambda name, conv: conv.groups > 1)[1].replaced == ["2", "3"]
    _, report = ddf.convert(_stack(), min_channels=32)
    assert report.replaced == ["5"] and "16 channels < min_channels=32" in report.skipped["1"]
    _, report = ddf.convert(_stack(), head=32)  # head must divide the channels: those layers stay convs
    assert report.replaced == ["5"] and "head=32 does not divide 16" in report.skipped["1"]


def test_geometry_and_ddf_options_are_carried_over():
    torch.manual_seed(0)
    model, report = ddf.convert(_stack(), kernel_combine="add", head=2, se_ratio=0.5, normalization="batch_norm",
                                input_size=(4, 9, 9))
    assert report.replaced == ["1", "2", "3", "5"]
    geometry = [(m.kernel_size, m.stride, m.dilation) for m in model if isinstance(m, ddf.DDFPack)]
    assert geometry == [(3, 1, 1), (5, 1, 2), (3, 2, 1), (3, 1, 1)]
    assert all(m.kernel_combine == "add" and m.head == 2 and m.se_ratio == 0.5 and m.normalization == "batch_norm"
               for m in model if isinstance(m, ddf.DDFPack))
    assert type(model[2]) is ddf.DDFPack and isinstance(model[1], DDFPackBias)  # bias=False -> plain DDFPack
    for size in (9, 10):
        assert model(torch.randn(2, 4, size, size)).shape == _stack()(torch.randn(2, 4, size, size)).shape


def test_same_padding_convs_timm_dynamic_and_torch_string():
    torch.manual_seed(0)
    dynamic = create_conv2d(8, 8, 3, stride=2, padding="same")
    assert isinstance(dynamic, Conv2dSame) and dynamic.padding == (0, 0)
    model = nn.Sequential(dynamic, nn.Conv2d(8, 8, 5, padding="same"))
    for size in (15, 16):
        x = torch.randn(2, 8, size, size)
        shape = model(x).shape
        converted, report = ddf.convert(model, inplace=False, input_size=None)
        assert report.replaced == ["0", "1"] and converted(x).shape == shape
    assert model[0] is dynamic  # inplace=False left the original alone


def test_conversion_keeps_mode_dtype_and_sharing():
    conv = nn.Conv2d(8, 8, 3, padding=1).double()
    model = nn.Sequential(conv, nn.ReLU(), conv).eval()
    model, report = ddf.convert(model, input_size=None)
    assert report.replaced == ["0"] and model[0] is model[2]  # one shared conv -> one shared DDF layer
    assert not model[0].training and model[0].bias.dtype == torch.float64
    assert model(torch.randn(1, 8, 6, 6, dtype=torch.float64)).dtype == torch.float64
    layer, report = ddf.convert(nn.Conv2d(8, 8, 3, padding=1))
    assert isinstance(layer, DDFPackBias) and report.replaced == [""]
