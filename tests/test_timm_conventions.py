"""timm's model conventions (as timm's own tests/test_models.py exercises them) for the DDF models."""
import pytest
import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names

import ddf  # noqa: F401  (registers the models)

FAST = ["ddf_mul_resnet_tiny", "ddf_add_resnet_tiny", "ddf_mul_resnet18"]


@pytest.mark.parametrize("name", FAST)
def test_forward_backward_default_cfg(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    x = torch.randn(2, *cfg["input_size"])
    out = model(x)
    assert out.shape == (2, cfg["num_classes"])
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # cfg fields point at real modules and match the network
    modules = dict(model.named_modules())
    assert cfg["first_conv"] in modules and isinstance(modules[cfg["first_conv"]], torch.nn.Conv2d)
    assert modules[cfg["first_conv"]].in_channels == 3
    assert cfg["classifier"] in modules
    assert len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    feat = model.forward_features(x)
    assert tuple(feat.shape[-2:]) == tuple(cfg["pool_size"])


@pytest.mark.parametrize("name", FAST)
def test_reset_classifier_and_no_classifier(name):
    model = timm.create_model(name)
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    headless = timm.create_model(name, num_classes=0)
    assert headless(torch.randn(1, 3, 64, 64)).shape == (1, headless.num_features)


@pytest.mark.parametrize("name", FAST)
def test_features_only_and_forward_intermediates(name):
    feats = timm.create_model(name, features_only=True)(torch.randn(1, 3, 64, 64))
    assert len(feats) == 5 and feats[-1].shape[-1] == 2
    model = timm.create_model(name)
    final, inter = model.forward_intermediates(torch.randn(1, 3, 64, 64))
    assert len(inter) == 5 and final.dim() == 4


@pytest.mark.parametrize("name", FAST)
def test_torch_fx_feature_extraction_forward_and_backward(name):
    """timm's fx feature extraction traces the network; DDF modules are leaves (registered notrace)."""
    model = timm.create_model(name)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert "layer4" in {n.split(".")[0] for n in eval_nodes}
    extractor = create_feature_extractor(model, return_nodes={"layer2": "l2", "layer4": "l4"})
    x = torch.randn(2, 3, 64, 64)
    out = extractor(x)
    assert set(out) == {"l2", "l4"} and out["l4"].shape[1] == model.num_features
    assert torch.allclose(out["l4"], model.forward_features(x), atol=1e-6)
    sum(v.mean() for v in out.values()).backward()
    assert model.layer1[0].conv2.spatial_branch[0].weight.grad is not None


def test_in_chans_adapts_released_weights(tmp_path):
    """in_chans=1 with pretrained weights: timm sums the first conv's weights (first_conv must name the real
    first conv of the deep stem, conv1.0)."""
    torch.manual_seed(0)
    src = timm.create_model("ddf_mul_resnet_tiny")
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    model = timm.create_model("ddf_mul_resnet_tiny", pretrained=True, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(path)))
    w = model.get_submodule("conv1.0").weight
    assert w.shape[1] == 1
    assert torch.allclose(w, src.get_submodule("conv1.0").weight.sum(dim=1, keepdim=True))
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


def test_bad_input_still_gets_clear_errors():
    model = timm.create_model("ddf_mul_resnet_tiny")
    with pytest.raises(ValueError, match="DDFPack: input must have shape"):
        model.layer1[0].conv2(torch.randn(1, 3, 8, 8))


# torch.jit.script/save/load are deprecated in recent torch (FutureWarning); timm still tests scripting
_JIT_DEPRECATED = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


def _scripted(module):
    return torch.jit.script(module)


@_JIT_DEPRECATED
@pytest.mark.parametrize("name", FAST + ["ddf_mul_resnet50", "ddf_add_resnet50"])
def test_torchscript_forward_backward_and_save(name, tmp_path):
    """timm's test_model_forward_torchscript: the scripted model gives the eager outputs and gradients, and
    survives torch.jit.save/load."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    scripted = _scripted(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(scripted(x), ref, atol=1e-5, rtol=1e-5)
    torch.jit.save(scripted, str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    loaded(xs).sum().backward()
    model(xe).sum().backward()
    assert torch.allclose(xs.grad, xe.grad, atol=1e-5, rtol=1e-4)


@_JIT_DEPRECATED
@pytest.mark.parametrize("kwargs", [dict(), dict(filters="spatial"), dict(filters="channel"),
                                    dict(normalization="batch_norm"), dict(normalization="sigmoid"),
                                    dict(kernel_combine="add", stride=2, head=2, dilation=2)])
def test_torchscript_ddfpack_variants(kwargs):
    torch.manual_seed(0)
    module = ddf.DDFPack(16, 3, **kwargs).eval()
    scripted = _scripted(module)
    x = torch.randn(2, 16, 9, 10)
    assert torch.allclose(scripted(x), module(x), atol=1e-6)
    with pytest.raises(torch.jit.Error, match=r"DDFPack: input must have shape \(B, 16, H, W\), got \(2, 8, 9, 10\)"):
        scripted(torch.randn(2, 8, 9, 10))


@_JIT_DEPRECATED
def test_torchscript_ddfuppack_typical_and_joint():
    torch.manual_seed(0)
    typical = ddf.DDFUpPack(8, 3).eval()
    joint = ddf.DDFUpPack(8, 3, joint_channels=3).eval()
    x, guide = torch.randn(1, 8, 5, 6), torch.randn(1, 3, 5, 6)
    assert torch.allclose(_scripted(typical)(x), typical(x), atol=1e-6)
    scripted_joint = _scripted(joint)
    assert torch.allclose(scripted_joint(x, guide), joint(x, guide), atol=1e-6)
    with pytest.raises(torch.jit.Error, match="forward needs joint_x"):
        scripted_joint(x)
