"""Loading a checkpoint never runs its code: a crafted pickle through every entry point (issue 30, item 1)."""
from __future__ import annotations

import argparse
import fractions
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import ddf  # noqa: F401  (registers the models)
import train
import validate
from training import cli
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.demo_data import build_demo_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Payload:
    """Unpickling this calls os.system, which creates ``marker``: the file exists iff the pickle's code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil(tmp_path, legacy=False):
    marker = tmp_path / "PWNED"
    model = timm.create_model("ddf_mul_resnet_tiny", num_classes=10)
    obj = {"arch": "ddf_mul_resnet_tiny", "state_dict": model.state_dict(), "epoch": 0, "x": _Payload(marker)}
    path = tmp_path / ("evil_legacy.pth" if legacy else "evil.pth")
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return str(path), marker


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("safe") / "ddf_demo")
    build_demo_dataset(root, train_per_class=4, val_per_class=2, img_size=32, verbose=False)
    return root


def _train_args(demo_root, out, *extra):
    return ["--demo-root", demo_root, "--demo-train-per-class", "4", "--demo-val-per-class", "2",
            "--demo-img-size", "32", "-b", "8", "--workers", "0", "--epochs", "1", "--warmup-epochs", "0",
            "--output", str(out), "--no-tensorboard", "--log-interval", "0", *extra]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_load_checkpoint_refuses_code_and_names_the_way_out(tmp_path, legacy):
    path, marker = _evil(tmp_path, legacy)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    assert not marker.exists()
    msg = str(ei.value)
    assert "needs arbitrary code" in msg and "--trust-checkpoint" in msg and path in msg
    if not legacy:
        assert "posix.system" in msg or "os.system" in msg  # what it holds, from torch's listing


def test_every_entry_point_refuses_the_payload(tmp_path, demo_root):
    path, marker = _evil(tmp_path)
    with pytest.raises(CheckpointError):
        validate.main([demo_root, "--checkpoint", path, "--workers", "0"])
    with pytest.raises((CheckpointError, cli.UsageError)):
        train.main(_train_args(demo_root, tmp_path / "o1", "--resume", path))
    with pytest.raises((CheckpointError, cli.UsageError)):
        train.main(_train_args(demo_root, tmp_path / "o2", "--initial-checkpoint", path))
    with pytest.raises(Exception):  # timm's own routes load with weights_only=True
        timm.create_model("ddf_mul_resnet_tiny", num_classes=10, checkpoint_path=path)
    with pytest.raises(Exception):
        timm.create_model("ddf_mul_resnet_tiny", num_classes=10, pretrained=True,
                          pretrained_cfg_overlay=dict(file=path))
    assert not marker.exists()


def test_validate_cli_refuses_with_one_line(tmp_path):
    path, marker = _evil(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "validate.py"), "--checkpoint", path, "--model",
                        "ddf_mul_resnet_tiny", "--workers", "0"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "needs arbitrary code" in r.stderr
    assert not marker.exists()


def test_release_refuses_the_payload_with_one_line(tmp_path):
    path, marker = _evil(tmp_path)
    out = tmp_path / "release"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "release.py"), path, "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "needs arbitrary code" in r.stderr
    assert not marker.exists() and not out.exists()


def test_trusted_file_loads_with_the_flag_and_converts_to_plain_data(tmp_path):
    model = timm.create_model("ddf_mul_resnet_tiny", num_classes=10)
    old = {"arch": "ddf_mul_resnet_tiny", "state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1),
           "rng": np.random.get_state(), "odd": fractions.Fraction(1, 3)}  # not loadable weights-only
    src = tmp_path / "old.pth"
    torch.save(old, src)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(src))
    assert load_checkpoint(str(src), trust=True)["odd"] == fractions.Fraction(1, 3)
    dst = tmp_path / "plain.pth.tar"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), str(src), str(dst)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "dropped checkpoint['odd']" in r.stderr
    ck = load_checkpoint(str(dst))
    assert ck["args"] == {"lr": 0.1} and ck["odd"] is None
    assert torch.equal(ck["rng"][1], torch.from_numpy(old["rng"][1]))
    for k, v in model.state_dict().items():
        assert torch.equal(ck["state_dict"][k], v)


def test_older_checkpoints_with_namespace_and_numpy_state_still_load(tmp_path):
    """What our checkpoints held before (numpy RNG state as an ndarray, timm's Namespace args): data only."""
    obj = {"args": argparse.Namespace(model="x"), "rng_state": {"numpy": np.random.get_state()},
           "state_dict": {"w": torch.randn(3)}}
    path = str(tmp_path / "older.pth.tar")
    save_checkpoint(obj, path)
    ck = load_checkpoint(path)
    assert ck["args"].model == "x" and np.array_equal(ck["rng_state"]["numpy"][1], obj["rng_state"]["numpy"][1])


def test_new_training_checkpoints_need_no_allow_list(tmp_path, demo_root):
    res = train.main(_train_args(demo_root, tmp_path / "o", "--experiment", "r"))
    last = os.path.join(res["output"], "last.pth.tar")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(last) == []
    torch.load(last, weights_only=True)  # with torch's default allow-list only
