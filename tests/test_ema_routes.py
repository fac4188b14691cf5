"""One rule for EMA weights in every route (issue 28 item 6): a checkpoint whose plain and EMA weights differ (top-1
0 vs 100 on a crafted image folder) gives the same weights through ddf.state_dict's unwrapper, timm pretrained
loading (file and state_dict overlays, checkpoint_path), validate.py (which prints 'weights: EMA' / 'weights:
model') and tools/release.py -- with and without an ``eval_on_ema`` record; --use-ema / --no-ema choose."""
from __future__ import annotations

import os

import pytest
import timm
import torch
from PIL import Image

import models  # noqa: F401  (registers the DDF-ResNets)
import validate
from ddf.state_dict import ema_chosen, unwrap_state_dict
from tools import release as release_cli
from training import cli

MODEL = "ddf_mul_resnet_tiny"


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Images of class 0 only; plain weights always answer class 1 (top-1 0), EMA weights class 0 (top-1 100)."""
    tmp = tmp_path_factory.mktemp("ema_routes")
    folder = tmp / "data" / "val" / "a"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        px = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(folder / f"{i}.jpeg")
    torch.manual_seed(0)
    sd = timm.create_model(MODEL, num_classes=2).state_dict()
    plain, ema = dict(sd), dict(sd)
    plain["fc.weight"], ema["fc.weight"] = torch.zeros_like(sd["fc.weight"]), torch.zeros_like(sd["fc.weight"])
    plain["fc.bias"], ema["fc.bias"] = torch.tensor([0.0, 10.0]), torch.tensor([10.0, 0.0])
    ckpt = {"arch": MODEL, "state_dict": plain, "state_dict_ema": ema, "num_classes": 2, "epoch": 0, "step": 0,
            "args": {}}  # no eval_on_ema record (timm's train.py, the original release)
    paths = {}
    for name, extra in (("no_record", {}), ("record_false", {"eval_on_ema": False}),
                        ("record_true", {"eval_on_ema": True})):
        paths[name] = str(tmp / f"{name}.pth.tar")
        torch.save({**ckpt, **extra}, paths[name])
    return {"tmp": tmp, "data": str(tmp / "data"), "plain": plain, "ema": ema, "paths": paths}


def _same(a, b):
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


def _validate(c, path, *extra, capsys=None):
    res = validate.main([c["data"], "--model", MODEL, "--checkpoint", path, "--workers", "0", "--img-size", "32",
                         *extra])
    return res[0]


@pytest.mark.parametrize("record", ["no_record", "record_false", "record_true"])
def test_every_route_takes_the_same_weights(crafted, record, capsys, tmp_path):
    c, path = crafted, crafted["paths"][record]
    ckpt = torch.load(path, weights_only=True)
    assert ema_chosen(ckpt)
    _same(unwrap_state_dict(ckpt), c["ema"])
    for kw in (dict(pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=2)),
               dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=ckpt, num_classes=2)), dict(checkpoint_path=path)):
        _same(timm.create_model(MODEL, num_classes=2, **kw).state_dict(), c["ema"])
    r = _validate(c, path)
    assert r["weights"] == "ema" and r["top1"] == 100.0
    assert "weights: EMA" in capsys.readouterr().out
    out = release_cli.main([path, "--out", str(tmp_path / "rel")])
    assert out["metadata"]["weights"] == "ema"
    (released,) = out["paths"]
    r2 = _validate(c, released)
    assert r2["weights"] == "ema" and r2["top1"] == 100.0 and "weights: EMA" in capsys.readouterr().out
    _same(timm.create_model(MODEL, num_classes=2, pretrained=True,
                            pretrained_cfg_overlay=dict(file=released, num_classes=2)).state_dict(), c["ema"])


def test_no_ema_and_use_ema_choose_in_every_route(crafted, capsys, tmp_path):
    c, path = crafted, crafted["paths"]["no_record"]
    ckpt = torch.load(path, weights_only=True)
    _same(unwrap_state_dict(ckpt, use_ema=False), c["plain"])
    r = _validate(c, path, "--no-ema")
    assert r["weights"] == "model" and r["top1"] == 0.0 and "weights: model" in capsys.readouterr().out
    assert _validate(c, path, "--use-ema")["top1"] == 100.0
    out = release_cli.main([path, "--out", str(tmp_path / "rel"), "--no-ema"])
    assert out["metadata"]["weights"] == "plain"
    (released,) = out["paths"]
    assert _validate(c, released)["top1"] == 0.0 and "weights: model" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--use-ema: .* holds only the plain"):
        _validate(c, released, "--use-ema")
    only_plain = str(tmp_path / "plain.pth.tar")
    torch.save({"arch": MODEL, "state_dict": c["plain"], "num_classes": 2}, only_plain)
    with pytest.raises(ValueError, match="no EMA weights"):
        _validate(c, only_plain, "--use-ema")
    with pytest.raises(release_cli_error(), match="--use-ema|no EMA weights"):
        release_cli.main([only_plain, "--out", str(tmp_path / "rel2"), "--use-ema"])
    assert not os.path.exists(tmp_path / "rel2")
    with pytest.raises(cli.UsageError, match="--use-ema needs --checkpoint"):
        validate.parse_args(["--model", MODEL, "--use-ema"])


def release_cli_error():
    from training.release import ReleaseError
    return ReleaseError
