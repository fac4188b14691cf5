"""Fail fast: under --bad-image error an unreadable image ends the run with one line and exit 2, with loader workers
and across ranks, never a hang (issue 29, item 1)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from training import cli
from training.demo_data import build_demo_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECT = "(use --bad-image skip to skip such files)"


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad") / "ddf_demo")
    build_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32, verbose=False)
    cls = sorted(os.listdir(os.path.join(root, "train")))[0]
    bad = os.path.join(root, "train", cls, "broken.jpg")
    with open(bad, "w") as f:
        f.write("this is text, not a JPEG")
    return root, bad


def _args(root, out, workers, batch):
    return [root, "--model", "ddf_mul_resnet_tiny", "--num-classes", "10", "--img-size", "32", "-b", str(batch),
            "-j", str(workers), "--epochs", "1", "--bad-image", "error", "--output", str(out), "--no-tensorboard"]


def _run(cmd, timeout=240):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_error_stops_with_one_line(broken_root, tmp_path, workers):
    root, bad = broken_root
    r = _run([sys.executable, "train.py", *_args(root, tmp_path / "out", workers, 16)])  # a hang fails by timeout
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert line == [f"error: unreadable image {bad}: UnidentifiedImageError: cannot identify image file "
                    f"'{bad}' {EXPECT}"]
    assert not list((tmp_path / "out").rglob("*.pth.tar")) and not list((tmp_path / "out").rglob("*.tmp"))


def test_bad_image_error_stops_every_rank(broken_root, tmp_path):
    root, bad = broken_root
    r = _run(["bash", "distributed_train.sh", "2", *_args(root, tmp_path / "out", 2, 8)])
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"error: unreadable image {bad}" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "distributed_train.sh: rank" in r.stderr
    assert not list((tmp_path / "out").rglob("*.pth.tar"))


def test_one_line_of_a_worker_exception():
    text = ("Caught KeyError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 3, in f\n    raise KeyError\nKeyError: \'label 7\'\n')
    assert cli.one_line(RuntimeError(text)) == "a DataLoader worker failed: KeyError: 'label 7'"
    assert cli.one_line(ValueError("plain\nmessage")) == "plain message"
