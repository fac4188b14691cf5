"""ddf.state_dict.unwrap_state_dict: the one unwrapper of checkpoints into model weights."""
import pytest
import torch

from ddf.state_dict import unwrap_state_dict


def _sd(seed):
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "fc.bias": torch.randn(5, generator=g)}


def test_raw_state_dict_and_wrapper_prefixes():
    sd = _sd(0)
    wrapped = {"module._orig_mod." + k: v for k, v in sd.items()}  # DDP around torch.compile
    for obj in (sd, wrapped, {"_orig_mod.module." + k: v for k, v in sd.items()}):
        out = unwrap_state_dict(obj)
        assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="bare state dict"):
        unwrap_state_dict(sd, use_ema=True)


def test_which_weights_win():
    plain, ema = _sd(1), _sd(2)
    ours_ema = {"state_dict": plain, "state_dict_ema": ema, "eval_on_ema": True, "arch": "x"}
    ours_plain = {"state_dict": plain, "state_dict_ema": ema, "eval_on_ema": False}  # EMA too: timm's loaders' rule
    timm_style = {"state_dict": plain, "state_dict_ema": ema, "epoch": 3}  # no eval_on_ema record: EMA
    only_model = {"model": plain, "optimizer": {}}
    only_ema = {"state_dict_ema": ema}
    for obj, want in ((ours_ema, ema), (ours_plain, ema), (timm_style, ema), (only_model, plain), (only_ema, ema)):
        out = unwrap_state_dict(obj)
        assert all(torch.equal(out[k], want[k]) for k in want)
    assert torch.equal(unwrap_state_dict(ours_ema, use_ema=False)["fc.bias"], plain["fc.bias"])
    assert torch.equal(unwrap_state_dict(ours_plain, use_ema=False)["fc.bias"], plain["fc.bias"])
    with pytest.raises(ValueError, match="no EMA weights"):
        unwrap_state_dict(only_model, use_ema=True)
    with pytest.raises(ValueError, match="only EMA weights"):
        unwrap_state_dict(only_ema, use_ema=False)


def test_errors_name_what_is_wrong():
    with pytest.raises(TypeError, match="must be a dict"):
        unwrap_state_dict([1, 2])
    with pytest.raises(ValueError, match="no model weights"):
        unwrap_state_dict({"epoch": 3, "optimizer": {}})
    with pytest.raises(ValueError, match="use_ema must be"):
        unwrap_state_dict(_sd(0), use_ema="yes")
