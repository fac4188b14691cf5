"""tools/release.py (issue 25 item 5): a run -> <model>-<sha8>.safetensors (+ .pth) with the model's weights alone,
plain / EMA / averaged; validate.py and timm.create_model load it and give the run's numbers; bad inputs are one
`error:` line, exit 2, nothing written. One tiny EMA demo run (3 epochs, top-2 checkpoints) serves every test."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open

import train
import validate
from tools import release as release_cli
from training import cli
from training import release as release_lib
from training.checkpoint import CheckpointError, load_checkpoint, read_index
from training.demo_data import build_demo_dataset
from training.release import args_sha256

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "ddf_mul_resnet_tiny"
NAME_RE = re.compile(rf"^{MODEL}-([0-9a-f]{{8}})\.(safetensors|pth)$")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    root = str(tmp / "ddf_demo")
    build_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32, verbose=False)
    res = train.main(["--demo-root", root, "--demo-train-per-class", "8", "--demo-val-per-class", "4",
                      "--demo-img-size", "32", "-b", "16", "--workers", "0", "--epochs", "3", "--warmup-epochs", "0",
                      "--model-ema", "--model-ema-decay", "0.5", "--checkpoint-hist", "2", "--output", str(tmp),
                      "--experiment", "run", "--seed", "3", "--no-tensorboard", "--log-interval", "0"])
    return res


def release(*argv):
    return release_cli.main([str(a) for a in argv])


def read(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def summary_row(run_dir, epoch):
    with open(os.path.join(run_dir, "summary.csv")) as f:
        return [r for r in csv.DictReader(f) if int(r["epoch"]) == epoch][0]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_ema_release_validates_to_the_runs_best(run, tmp_path):
    out = release(run["output"], "--out", tmp_path / "rel")
    (path,) = out["paths"]
    m = NAME_RE.match(os.path.basename(path))
    assert m and m.group(2) == "safetensors"
    assert hashlib.sha256(open(path, "rb").read()).hexdigest()[:8] == m.group(1)
    assert os.listdir(tmp_path / "rel") == [os.path.basename(path)]  # no temporary left
    (again,) = release(run["output"], "--out", tmp_path / "again")["paths"]  # reproducible: same bytes, same name
    assert os.path.basename(again) == os.path.basename(path) and open(again, "rb").read() == open(path, "rb").read()
    best = load_checkpoint(run["best_checkpoint"])
    sd, meta = read(path)
    assert_same(sd, best["state_dict_ema"])  # the EMA weights, alone
    assert meta["model"] == MODEL and meta["weights"] == "ema" and meta["epoch"] == str(run["best_epoch"])
    assert float(meta["top1"]) == pytest.approx(run["best_metric"], abs=1e-9)
    assert meta["args_sha256"] == args_sha256(best) and len(meta["args_sha256"]) == 64
    # validate.py with only --checkpoint and --model: the demo data, classes and transform come from the metadata
    res = validate.main(["--checkpoint", path, "--model", MODEL, "--workers", "0"])
    assert res[0]["images"] == 40 and f"{res[0]['top1']:.3f}" == f"{run['best_metric']:.3f}"


def test_plain_release_with_pth_validates_to_the_plain_top1(run, tmp_path):
    out = release(run["output"], "--out", tmp_path / "rel", "--no-ema", "--pth")
    st, pth = out["paths"]
    assert st.endswith(".safetensors") and pth.endswith(".pth") and all(NAME_RE.match(os.path.basename(p))
                                                                       for p in (st, pth))
    assert hashlib.sha256(open(pth, "rb").read()).hexdigest()[:8] == NAME_RE.match(os.path.basename(pth)).group(1)
    best = load_checkpoint(run["best_checkpoint"])
    sd, meta = read(st)
    assert_same(sd, best["state_dict"])
    assert_same(load_checkpoint(pth), best["state_dict"])  # .pth: the same bare state dict, loads weights-only
    plain_top1 = float(summary_row(run["output"], run["best_epoch"])["eval_top1"])
    assert meta["weights"] == "plain" and float(meta["top1"]) == pytest.approx(plain_top1, abs=1e-6)
    assert not torch.equal(best["state_dict"]["fc.weight"], best["state_dict_ema"]["fc.weight"])  # EMA differs
    res = validate.main(["--checkpoint", st, "--model", MODEL, "--workers", "0"])
    assert f"{res[0]['top1']:.3f}" == f"{plain_top1:.3f}"


def test_timm_create_model_loads_the_release(run, tmp_path):
    (path,) = release(run["output"], "--out", tmp_path / "rel")["paths"]
    sd, _ = read(path)
    model = timm.create_model(MODEL, pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=path, num_classes=10))
    assert_same(model.state_dict(), sd)
    # a file released for another model fails loudly (strict), never loads partly
    with pytest.raises(RuntimeError, match="state_dict"):
        timm.create_model("ddf_add_resnet18", pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=path, num_classes=10))


def test_average_of_the_two_best_checkpoints(run, tmp_path):
    ranked = read_index(os.path.join(run["output"], "checkpoints.json"))["ranked"]
    assert len(ranked) == 2
    a, b = (load_checkpoint(os.path.join(run["output"], r[2]))["state_dict_ema"] for r in ranked)
    (path,) = release(run["output"], "--out", tmp_path / "rel", "--average", "2")["paths"]
    sd, meta = read(path)
    assert sd.keys() == a.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.equal(sd[k], ((a[k].double() + b[k].double()) / 2).to(a[k].dtype)), k
        else:  # num_batches_tracked: the best checkpoint's
            assert torch.equal(sd[k], a[k]), k
    assert not torch.equal(a["fc.weight"], b["fc.weight"])  # two different checkpoints were averaged
    assert meta["weights"] == "average of 2 (ema)" and meta["top1"] == "not measured"
    assert meta["epoch"] == f"{ranked[0][1]},{ranked[1][1]}"
    assert meta["source"] == f"{ranked[0][2]},{ranked[1][2]}"
    # --no-ema: the plain weights averaged
    (plain,) = release(run["output"], "--out", tmp_path / "rel2", "--average", "2", "--no-ema")["paths"]
    pa, pb = (load_checkpoint(os.path.join(run["output"], r[2]))["state_dict"] for r in ranked)
    assert torch.equal(read(plain)[0]["fc.weight"], ((pa["fc.weight"].double() + pb["fc.weight"].double()) / 2).float())


def test_top1_is_the_one_measured_on_the_released_weights():
    ck = {"epoch": 4, "step": 0, "eval_on_ema": True, "metrics": {"top1": 60.0}}
    rows = [{"epoch": 4, "eval_top1": 55.0, "ema_eval_top1": 60.0}]
    assert release_lib._top1(ck, True, rows) == "60.0"
    assert release_lib._top1(ck, False, rows) == "55.0"  # plain weights of an EMA run: the epoch's eval_top1
    other_run = [{"epoch": 4, "eval_top1": 55.0, "ema_eval_top1": 61.0}]  # a row that is not this checkpoint's
    assert release_lib._top1(ck, False, other_run) == "not measured"
    assert release_lib._top1(ck, False, None) == "not measured"
    assert release_lib._top1(dict(ck, step=3), True, rows) == "not measured"  # mid-epoch: nothing measured on it
    assert release_lib._top1({"epoch": 1, "eval_on_ema": False, "metrics": {"top1": 7.5}}, False, None) == "7.5"


def _fails(argv, capsys, arg):
    """Runs the script's main as its command line does: one `error:` line naming ``arg``, exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_cli(lambda: release(*argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and arg in err[0], err
    return err[0]


def test_bad_inputs_are_one_error_line_and_write_nothing(run, tmp_path, capsys):
    out = tmp_path / "rel"
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.pth.tar"
    data = open(run["best_checkpoint"], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    state_dict_only = tmp_path / "sd.pth"
    torch.save(load_checkpoint(run["best_checkpoint"])["state_dict"], state_dict_only)
    plain_folder = tmp_path / "folder"
    plain_folder.mkdir()
    src = "RUN_DIR_OR_CHECKPOINT"
    assert "not a zip" in _fails([not_ckpt, "--out", out], capsys, src)
    assert "damaged" in _fails([truncated, "--out", out], capsys, src)
    assert "not a train.py checkpoint" in _fails([state_dict_only, "--out", out], capsys, src)
    assert "does not exist" in _fails([tmp_path / "missing", "--out", out], capsys, src)
    assert "not a train.py run folder" in _fails([plain_folder, "--out", out], capsys, src)
    assert "fewer than 3" in _fails([run["output"], "--out", out, "--average", "3"], capsys, "--average 3")
    assert "needs a run folder" in _fails([run["best_checkpoint"], "--out", out, "--average", "2"], capsys,
                                          "--average 2")
    _fails([run["output"], "--out", out, "--average", "0"], capsys, "--average")
    _fails([run["output"]], capsys, "--out")
    assert not out.exists()  # nothing written, not even the folder
    # an existing output file is refused and kept; the other file of the release is not left behind
    (first,) = release(run["output"], "--out", out)["paths"]
    before = open(first, "rb").read()
    assert "exists" in _fails([run["output"], "--out", out, "--pth"], capsys, "--out")
    assert os.listdir(out) == [os.path.basename(first)] and open(first, "rb").read() == before
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert "not a folder" in _fails([run["output"], "--out", blocked], capsys, "--out")


def test_a_failure_while_writing_leaves_nothing(run, tmp_path, monkeypatch):
    def boom(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(release_lib, "write_verified", boom)
    out = tmp_path / "rel"
    with pytest.raises(OSError):
        release(run["output"], "--out", out, "--pth")  # .safetensors written, then the .pth fails
    assert os.listdir(out) == []


def test_the_script_and_validate_on_a_damaged_release(run, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "release.py"), run["output"], "--out",
                        str(tmp_path / "rel")], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    (name,) = os.listdir(tmp_path / "rel")
    assert r.stdout.startswith("wrote ") and name in r.stdout and "ema weights" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "release.py"), str(tmp_path / "none"), "--out",
                        str(tmp_path / "rel2")], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: RUN_DIR_OR_CHECKPOINT") and not (tmp_path / "rel2").exists()
    path = tmp_path / "rel" / name
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="damaged"):
        validate.main(["--checkpoint", str(damaged), "--model", MODEL, "--workers", "0"])
    with pytest.raises(CheckpointError, match="not found"):
        validate.main(["--checkpoint", str(tmp_path / "none.safetensors"), "--model", MODEL])
    meta = json.loads(json.dumps(read(str(path))[1]))
    assert set(meta) <= set(release_lib.META_KEYS) and all(isinstance(v, str) for v in meta.values())
