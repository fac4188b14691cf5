"""Issue 30 items 4 and 5: options mean what they say or are one line naming the option, checked before the work;
outputs of validate.py / test_time.py are created before evaluating or measuring and never silently replaced; a
full disk while saving a checkpoint is one line. Tiny demo data, as tests/test_train.py."""
from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

import test_time
import train
import validate
from training import cli
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNWRITABLE = "/proc"  # the folder exists, access() says writable to root, creating a file fails


def tiny_args(demo_root, out, name, *extra):
    return ["--demo-root", demo_root, "--demo-train-per-class", "8", "--demo-val-per-class", "4",
            "--demo-img-size", "32", "-b", "16", "--workers", "0", "--log-interval", "0", "--epochs", "2",
            "--warmup-epochs", "1", "--output", str(out), "--experiment", name, "--seed", "3", *extra]


def run_cli(main, argv, capsys):
    """(exit status, stderr) of ``main(argv)`` run as the scripts run it (training.cli.run_cli)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.run_cli(lambda: main(argv))
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err


def val_args(demo_root, *extra):
    # random weights of the tiny demo model on the 40 demo val images: a real, fast evaluation
    return [demo_root, "--model", "ddf_mul_resnet_tiny", "--img-size", "32", "--workers", "0", "-b", "40", *extra]


# ------------------------------------------------------------------------------------------- item 5: outputs
def test_validate_unwritable_results_file_fails_before_evaluating(demo_root, monkeypatch):
    calls = []
    monkeypatch.setattr(validate, "validate_one", lambda *a, **k: calls.append(a) or {})
    with pytest.raises(ValueError, match=r"^--results-file: cannot create files in /proc"):
        validate.main(val_args(demo_root, "--results-file", UNWRITABLE + "/r.csv"))
    assert calls == []  # old main evaluated first, then failed naming a temporary file


@pytest.mark.parametrize("ext", ["csv", "json"])
def test_validate_existing_results_file_is_appended_to(demo_root, tmp_path, ext, capsys):
    path = str(tmp_path / f"r.{ext}")
    validate.main(val_args(demo_root, "--results-file", path))
    validate.main(val_args(demo_root, "--results-file", path, "--crop-pct", "0.9"))
    assert "appended after 1 earlier row(s)" in capsys.readouterr().out
    if ext == "json":
        rows = json.loads(open(path).read())
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    assert len(rows) == 2 and [float(r["crop_pct"]) for r in rows] == [1.0, 0.9]  # old main: only the last row
    assert all(int(r["images"]) == 40 for r in rows)


def test_validate_foreign_results_file_is_kept(demo_root, tmp_path, monkeypatch):
    path = tmp_path / "notes.csv"
    path.write_text("name,score\nmine,1\n")
    calls = []
    monkeypatch.setattr(validate, "validate_one", lambda *a, **k: calls.append(a) or {})
    with pytest.raises(ValueError, match=r"notes\.csv exists and is not a validate\.py results file; it is kept"):
        validate.main(val_args(demo_root, "--results-file", str(path)))
    assert path.read_text() == "name,score\nmine,1\n" and calls == []


def test_validate_results_file_created_by_us_is_removed_when_nothing_was_written(demo_root, tmp_path):
    path = tmp_path / "r.csv"
    with pytest.raises(CheckpointError):
        validate.main(val_args(demo_root, "--checkpoint", str(tmp_path / "missing.pth.tar"), "--results-file",
                               str(path)))
    assert not path.exists()


TT_TINY = ["--device", "cpu", "--batch", "1", "--channels", "8", "--resolutions", "7", "--tables", "A",
           "--table2-shape", "1,8,10,12", "--warmup", "0", "--min-repeats", "1", "--max-repeats", "1",
           "--min-time", "0", "--copy-mib", "1", "--rounds", "1", "--threads", "1", "--quiet"]


@pytest.mark.parametrize("option", ["--csv", "--json", "--markdown"])
def test_test_time_unwritable_output_fails_before_measuring(option, monkeypatch, capsys):
    monkeypatch.setattr(test_time, "copy_bandwidth", lambda *a: pytest.fail("measured before checking outputs"))
    suffix = {"--csv": ".csv", "--json": ".json", "--markdown": ".md"}[option]
    with pytest.raises(SystemExit) as exc:
        test_time.main(TT_TINY + [option, UNWRITABLE + "/x" + suffix])
    assert exc.value.code == 2
    assert f"{option}: cannot create files in {UNWRITABLE}" in capsys.readouterr().err


def test_test_time_keeps_an_existing_file_and_removes_its_own_empty_ones(tmp_path, monkeypatch, capsys):
    old = tmp_path / "old.json"
    old.write_text("mine\n")
    fresh = tmp_path / "fresh.csv"
    monkeypatch.setattr(test_time, "copy_bandwidth", lambda *a: pytest.fail("measured before checking outputs"))
    with pytest.raises(SystemExit):
        test_time.main(TT_TINY + ["--csv", str(fresh), "--json", str(old)])
    err = capsys.readouterr().err
    assert "--json" in err and "does not replace results files" in err
    assert old.read_text() == "mine\n"  # old main: replaced after measuring
    assert not fresh.exists()  # --csv was created first (claimed), then removed: nothing was written to it


def test_test_time_save_results_never_replaces_an_earlier_report(tmp_path):
    first = test_time.main(TT_TINY + ["--save-results", str(tmp_path)])
    second = test_time.main(TT_TINY + ["--save-results", str(tmp_path)])
    assert first["saved"][0] != second["saved"][0] and second["saved"][0].endswith("-2.md")
    assert all(os.path.getsize(p) > 0 for p in first["saved"] + second["saved"])


def test_test_time_exits_non_zero_when_a_row_failed(tmp_path):
    # 4 channels: the DDF module's squeeze gets 0 channels, so its row fails (reported in the table)
    argv = [a if a != "8" else "4" for a in TT_TINY] + ["--csv", str(tmp_path / "r.csv")]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "test_time.py"), *argv], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]  # old main: 0
    assert p.stderr.strip().splitlines()[-1].startswith("error: 1 measurement(s) failed"), p.stderr[-2000:]
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["entry"] for r in rows if r["status"] != "ok"] == ["ddf"] and len(rows) == 4


def test_full_disk_while_saving_a_checkpoint_is_one_line(demo_root, tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):  # the 2nd save (epoch 1's; an epoch-end save serialises once) hits a full disk
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    code, err = run_cli(train.main, tiny_args(demo_root, tmp_path, "full"), capsys)
    run = os.path.join(str(tmp_path), "full")
    last = os.path.join(run, "last.pth.tar")
    assert code == 2
    assert err.strip().splitlines()[-1] == f"error: no space left on {run}; the previous checkpoint {last} is intact"
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(last)["epoch"] == 0  # the epoch-0 checkpoint, verified
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


def test_full_disk_for_real_on_a_tiny_tmpfs(tmp_path):
    mnt = str(tmp_path / "full")
    os.makedirs(mnt)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the patched test above covers the message")
    try:
        path = os.path.join(mnt, "last.pth.tar")
        save_checkpoint({"w": torch.randn(1000)}, path)
        with pytest.raises(CheckpointError, match=f"^no space left on {mnt}; the previous checkpoint {path} is "
                                                  f"intact$"):
            save_checkpoint({"w": torch.randn(200000)}, path)  # torch's own error says only 'unexpected pos'
        assert load_checkpoint(path)["w"].shape == (1000,) and os.listdir(mnt) == ["last.pth.tar"]
        with pytest.raises(CheckpointError, match="no checkpoint was written to"):
            save_checkpoint({"w": torch.randn(200000)}, os.path.join(mnt, "other.pth.tar"))
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)  # lazy: a failing test may hold a file open


# ---------------------------------------------------------------------- item 4: values refused at parse time
@pytest.mark.parametrize("argv,match", [
    (["--lr", "1e30"], r"^--lr must be > 0\.0 and <= 100\.0, got 1e\+30$"),
    (["--lr", "inf"], r"^--lr must be a finite number > 0\.0 and <= 100\.0, got inf$"),
    (["--mean", "0.5", "nan", "0.5"], r"^--mean must be a finite number, got \[0\.5, nan, 0\.5\]$"),
    (["--std", "0.2", "inf", "0.2"], r"^--std must be a finite number > 0\.0"),
    (["--ratio", "1", "inf"], r"^--ratio must be a finite number > 0\.0, got \(1\.0, inf\)$"),
    (["--scale", "nan", "1"], r"^--scale must be a finite number > 0\.0 and <= 1\.0"),
    (["--warmup-lr", "1e9"], r"^--warmup-lr must be >= 0\.0 and <= 100\.0"),
], ids=["lr-1e30", "lr-inf", "mean-nan", "std-inf", "ratio-inf", "scale-nan", "warmup-lr"])
def test_train_non_finite_or_absurd_values_refused_at_parse_time(demo_root, argv, match):
    with pytest.raises(cli.UsageError, match=match):
        train.parse_args(["--demo-root", demo_root, *argv])


def test_train_yaml_inf_lr_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: .inf\n")
    with pytest.raises(cli.UsageError, match=r"^--lr must be a finite number"):
        train.parse_args(["--config", str(cfg), str(tmp_path)])


def test_validate_nan_mean_refused(demo_root):
    with pytest.raises(cli.UsageError, match=r"^--mean must be a finite number"):
        validate.parse_args(val_args(demo_root, "--mean", "nan"))
