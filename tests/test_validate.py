"""validate.py: checkpoints (ours, EMA, bare/released-style), several at once, results files, errors."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import train
import validate
from training.checkpoint import CheckpointError, load_checkpoint
from training.demo_data import build_demo_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("val")
    root = str(tmp / "ddf_demo")
    build_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32, verbose=False)
    res = train.main(["--demo-root", root, "--demo-train-per-class", "8", "--demo-val-per-class", "4",
                      "--demo-img-size", "32", "-b", "16", "--workers", "0", "--epochs", "2", "--warmup-epochs", "0",
                      "--model-ema", "--model-ema-decay", "0.5", "--output", str(tmp), "--experiment", "run",
                      "--no-tensorboard", "--log-interval", "0"])
    return root, res, tmp


def test_ema_checkpoint_validates_to_logged_metric(trained, capsys):
    root, res, _ = trained
    ck = load_checkpoint(res["best_checkpoint"])
    assert ck["eval_on_ema"] and ck["state_dict_ema"] is not None
    out = validate.main([root, "--checkpoint", res["best_checkpoint"], "--workers", "0"])
    assert out[0]["weights"] == "ema"  # auto: the checkpoint holds EMA weights
    assert f"{out[0]['top1']:.3f}" == f"{res['best_metric']:.3f}"
    assert "top-1: " in capsys.readouterr().out.strip().splitlines()[-1]
    raw = validate.main([root, "--checkpoint", res["best_checkpoint"], "--workers", "0", "--no-ema"])
    assert raw[0]["weights"] == "model"
    with open(os.path.join(res["output"], "summary.csv")) as f:  # the non-EMA top-1 train.py logged that epoch
        row = [r for r in csv.DictReader(f) if int(r["epoch"]) == res["best_epoch"]][0]
    assert f"{raw[0]['top1']:.3f}" == f"{float(row['eval_top1']):.3f}"
    assert f"{float(row['ema_eval_top1']):.3f}" == f"{res['best_metric']:.3f}"


def test_several_checkpoints_and_results_files(trained, tmp_path, capsys):
    root, res, tmp = trained
    last = os.path.join(res["output"], "last.pth.tar")
    for ext in ("csv", "json"):
        path = str(tmp_path / f"results.{ext}")
        out = validate.main([root, "--checkpoint", res["best_checkpoint"], last, "--workers", "0", "-b", "7",
                             "--results-file", path])
        assert len(out) == 2
        if ext == "csv":
            with open(path) as f:
                rows = list(csv.DictReader(f))
        else:
            with open(path) as f:
                rows = json.load(f)
        assert [float(r["top1"]) for r in rows] == [r["top1"] for r in out]
        assert all(int(r["images"]) == 40 for r in rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("best of 2:") and "top-1: " in lines[-1]


def test_bare_state_dict_needs_model(trained, tmp_path):
    root, res, _ = trained
    ck = load_checkpoint(res["best_checkpoint"])
    bare = str(tmp_path / "released_style.pth")
    torch.save({"module." + k: v for k, v in ck["state_dict_ema"].items()}, bare)  # DDP-prefixed, like releases
    with pytest.raises(ValueError, match="--model is required"):
        validate.main([root, "--checkpoint", bare, "--workers", "0"])
    out = validate.main([root, "--model", "ddf_mul_resnet_tiny", "--checkpoint", bare, "--workers", "0",
                         "--img-size", "32", "--crop-pct", "1.0", "--interpolation", "bilinear"])
    assert f"{out[0]['top1']:.3f}" == f"{res['best_metric']:.3f}"


def test_validate_options_amp_channels_last_and_errors(trained, tmp_path):
    root, res, _ = trained
    out = validate.main([root, "--checkpoint", res["best_checkpoint"], "--workers", "0", "--amp", "--channels-last"])
    assert out[0]["precision"].startswith("bfloat16") and 0.0 <= out[0]["top1"] <= 100.0
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        validate.main([root, "--checkpoint", str(tmp_path / "missing.pth.tar")])
    with pytest.raises(ValueError, match="results-file"):
        validate.main([root, "--checkpoint", res["best_checkpoint"], "--results-file", "x.txt"])
    other = tmp_path / "other"
    (other / "val" / "cat").mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (32, 32), (1, 2, 3)).save(other / "val" / "cat" / "a.jpeg")
    with pytest.raises(ValueError, match="differ from the classes the checkpoint was trained on"):
        validate.main([str(other), "--checkpoint", res["best_checkpoint"], "--workers", "0"])


def test_one_bad_checkpoint_keeps_the_good_results(trained, tmp_path, capsys):
    root, res, _ = trained
    bad = tmp_path / "damaged.pth.tar"
    bad.write_bytes(open(res["best_checkpoint"], "rb").read())
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    bad.write_bytes(bytes(data))
    results_file = tmp_path / "r.json"
    with pytest.raises(validate.ValidationFailed, match="damaged.pth.tar"):
        validate.main([root, "--checkpoint", res["best_checkpoint"], str(bad), "--workers", "0",
                       "--results-file", str(results_file)])
    err = capsys.readouterr().err
    assert "damaged" in err and str(bad) in err
    rows = json.loads(results_file.read_text())
    assert [r["checkpoint"] for r in rows] == [os.path.abspath(res["best_checkpoint"])]
    assert f"{rows[0]['top1']:.3f}" == f"{res['best_metric']:.3f}"
    with pytest.raises(CheckpointError, match="damaged"):  # alone: the error itself
        validate.main([root, "--checkpoint", str(bad), "--workers", "0"])
