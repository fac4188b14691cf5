"""train.py / distributed_train.sh / configs / demo data: short CPU runs on a tiny demo dataset."""
from __future__ import annotations

import csv
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import train
import validate
from training.checkpoint import CheckpointSaver, load_checkpoint, save_checkpoint
from training.data import DatasetError, create_dataset

BEST_RE = re.compile(r"^best top-1: (\d+\.\d+) \(epoch (\d+)\) checkpoint: (\S+)$", re.M)


def tiny_args(demo_root, out, name, *extra):
    # 80 train images / batch 16 = 5 steps per epoch; the demo config supplies model and schedule
    return ["--demo-root", demo_root, "--demo-train-per-class", "8", "--demo-val-per-class", "4",
            "--demo-img-size", "32", "-b", "16", "--workers", "0", "--log-interval", "2", "--epochs", "2",
            "--warmup-epochs", "1", "--output", str(out), "--experiment", name, "--seed", "3", "--deterministic",
            *extra]


def test_demo_end_to_end_and_validate_reprints(demo_root, tmp_path, capsys):
    res = train.main(tiny_args(demo_root, tmp_path, "e2e"))
    out = capsys.readouterr().out
    m = BEST_RE.search(out)
    assert m, out[-2000:]
    assert "img/s" in out and "ETA" in out  # live progress line
    assert "| global batch 16 (1 x 16), lr 0.003 (given) |" in out  # the demo config's lr, with the global batch
    run = os.path.join(str(tmp_path), "e2e")
    for f in ("last.pth.tar", "model_best.pth.tar", "summary.csv", "args.yaml", "checkpoints.json"):
        assert os.path.isfile(os.path.join(run, f)), f
    assert glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*"))
    assert not glob.glob(os.path.join(run, "*.tmp")) and not glob.glob(os.path.join(run, ".*.tmp"))
    with open(os.path.join(run, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(0.0 <= float(r["eval_top1"]) <= 100.0 and float(r["train_loss"]) > 0 for r in rows)
    best = load_checkpoint(m.group(3))
    assert best["arch"] == "ddf_mul_resnet_tiny" and best["args"]["model"] == "ddf_mul_resnet_tiny"
    assert best["num_classes"] == 10 and int(m.group(2)) == best["epoch"]
    assert f"{best['metric']:.3f}" == m.group(1) == f"{res['best_metric']:.3f}"
    assert max(float(r["eval_top1"]) for r in rows) == pytest.approx(float(m.group(1)), abs=1e-3)

    # validate.py with no data argument: the demo val split the checkpoint was trained on, model from 'arch'
    results = validate.main(["--checkpoint", m.group(3), "--workers", "0"])
    vout = capsys.readouterr().out.strip().splitlines()
    assert f"top-1: {m.group(1)}" in vout[-1], vout[-1]
    assert results[0]["model"] == "ddf_mul_resnet_tiny" and results[0]["images"] == 40


def _states_close(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        if torch.is_tensor(a[k]) and a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), f"{what}: {k}"
        elif torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.mark.parametrize("stop_after", [7, 5], ids=["mid-epoch", "epoch-boundary"])
def test_resume_matches_uninterrupted(demo_root, tmp_path, capsys, stop_after):
    # mixup (numpy RNG), drop-path (torch RNG) and EMA make this sensitive to every piece of restored state
    extra = ("--mixup", "0.4", "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9")
    full = train.main(tiny_args(demo_root, tmp_path, "full", *extra))
    part = train.main(tiny_args(demo_root, tmp_path, "part", "--stop-after-steps", str(stop_after), *extra))
    assert part["interrupted"] and part["global_step"] == stop_after
    last = os.path.join(str(tmp_path), "part", "last.pth.tar")
    ck = load_checkpoint(last)
    assert (ck["epoch"], ck["step"]) == ((1, 2) if stop_after == 7 else (0, 0))
    resumed = train.main(tiny_args(demo_root, tmp_path, "ignored", "--experiment", "part", "--resume", last, *extra))
    assert resumed["global_step"] == full["global_step"] == 10
    a = load_checkpoint(os.path.join(str(tmp_path), "full", "last.pth.tar"))
    b = load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 1 and b["step"] == 0
    _states_close(a["state_dict"], b["state_dict"], "weights")
    _states_close(a["state_dict_ema"], b["state_dict_ema"], "EMA weights")
    mom_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values() if "momentum_buffer" in s] or \
        [s["exp_avg"] for s in a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values() if "momentum_buffer" in s] or \
        [s["exp_avg"] for s in b["optimizer"]["state"].values()]
    assert len(mom_a) == len(mom_b) > 0
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(mom_a, mom_b))
    assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-5)
    rows = {}
    for name in ("full", "part"):
        with open(os.path.join(str(tmp_path), name, "summary.csv")) as f:
            rows[name] = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows["part"]] == ["0", "1"]
    for ra, rb in zip(rows["full"], rows["part"]):
        assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), rel=1e-5)
        assert float(ra["eval_loss"]) == pytest.approx(float(rb["eval_loss"]), rel=1e-5)


def test_amp_on_cpu_runs_bfloat16(demo_root, tmp_path, capsys):
    res = train.main(tiny_args(demo_root, tmp_path, "amp", "--amp", "--epochs", "1", "--no-tensorboard"))
    out = capsys.readouterr().out
    assert "bfloat16 autocast on CPU" in out
    assert res["best_checkpoint"] and os.path.isfile(res["best_checkpoint"])
    assert torch.isfinite(torch.tensor(res["history"][0]["train_loss"]))


def test_two_process_torchrun_gloo_and_validate(demo_root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [os.path.join(ROOT, "distributed_train.sh"), "2",
           *tiny_args(demo_root, tmp_path, "ddp", "--epochs", "1", "--no-tensorboard", "-b", "8")]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 process(es) on cpu" in p.stdout
    m = BEST_RE.search(p.stdout)
    assert m, p.stdout[-2000:]
    ck = load_checkpoint(m.group(3))
    assert ck["arch"] == "ddf_mul_resnet_tiny" and not any(k.startswith("module.") for k in ck["state_dict"])
    # the DDP run evaluated the val split sharded over 2 ranks; one process must reprint the same top-1
    results = validate.main(["--checkpoint", m.group(3), "--workers", "0", "-b", "8"])
    assert f"{results[0]['top1']:.3f}" == m.group(1)


# ----------------------------------------------------------------------------------------- data errors
def _run_expect(args, exc, *fragments):
    with pytest.raises(exc) as ei:
        train.main(args)
    for frag in fragments:
        assert frag in str(ei.value), str(ei.value)


def test_data_errors_name_the_path(tmp_path):
    base = ["--workers", "0", "--epochs", "1", "--output", str(tmp_path / "out"), "--model", "ddf_mul_resnet_tiny"]
    missing = tmp_path / "nope"
    _run_expect([str(missing), *base], DatasetError, str(missing), "data root not found")
    root = tmp_path / "ds"
    (root / "train" / "a").mkdir(parents=True)
    _run_expect([str(root), *base], DatasetError, "class folder(s) contain no images", str(root / "train" / "a"))
    from PIL import Image
    Image.new("RGB", (8, 8), (10, 200, 30)).save(root / "train" / "a" / "x.jpeg")
    _run_expect([str(root), *base], DatasetError, "split folder not found", str(root / "val"))
    (root / "val").mkdir()
    _run_expect([str(root), *base], DatasetError, "no class folders", str(root / "val"))
    (root / "val" / "a").mkdir()
    (root / "val" / "notes.txt").write_text("not an image")
    _run_expect([str(root), *base], DatasetError, "contain no images", str(root / "val" / "a"))


def test_unreadable_image_is_reported_by_path(tmp_path):
    import logging
    from PIL import Image
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 30)).save(tmp_path / "train" / c / "good.jpeg")
    bad = tmp_path / "train" / "a" / "bad.jpeg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = create_dataset(str(tmp_path), "train", bad_image="skip")
    idx = [p for p, _ in ds.reader.samples].index(str(bad))
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("ddf.data")
    logger.addHandler(handler)
    try:
        img, label = ds[idx]
    finally:
        logger.removeHandler(handler)
    assert any(str(bad) in r.getMessage() for r in records) and img.size == (8, 8)
    strict = create_dataset(str(tmp_path), "train", bad_image="error")
    with pytest.raises(DatasetError, match=re.escape(str(bad))):  # UnreadableImageError: one line from the CLI
        strict[idx]


def test_cli_error_exit_code_and_message(tmp_path):
    missing = str(tmp_path / "no_such_imagenet")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), missing, "--model", "ddf_mul_resnet_tiny"],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "data root not found" in p.stderr and missing in p.stderr, p.stderr[-2000:]


# ------------------------------------------------------------------------------------ configs and args
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_there_are_configs_for_the_paper_tables():
    names = {os.path.basename(c)[:-5] for c in CONFIGS}
    for n in ("demo", "resnet18", "ddf_mul_resnet18", "ddf_add_resnet18", "resnet50", "ddf_mul_resnet50",
              "ddf_add_resnet50", "resnet101", "ddf_mul_resnet101", "ddf_add_resnet101",
              "ablation_r50_spatial_only", "ablation_r50_channel_only", "ablation_r50_batch_norm",
              "ablation_r50_sigmoid", "ablation_r50_se0.3", "ablation_r50_se0.4"):
        assert n in names, n


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(c) for c in CONFIGS])
def test_config_parses_and_names_a_creatable_model(path):
    import timm
    args = train.parse_args(["--config", path, "/some/imagenet"])
    assert args.data == "/some/imagenet" and args.config == path
    with torch.device("meta"):
        model = timm.create_model(args.model, pretrained=False, num_classes=1000, **args.model_kwargs)
    assert sum(p.numel() for p in model.parameters()) > 0
    if os.path.basename(path) != "demo.yaml":  # the paper's protocol
        assert (args.opt, args.momentum, args.weight_decay, args.sched) == ("sgd", 0.9, 1e-4, "cosine")
        assert (args.epochs, args.min_lr, args.img_size, args.lr, args.batch_size) == (120, 1e-5, 224, None, 128)
        assert (args.lr_base, args.lr_base_size) == (0.1, 256)  # the lr follows the global batch (issue 28 item 5)
        assert train.effective_lr(args, 8) == (pytest.approx(0.4), "lr-base 0.1 x (1024 / 256)")
        assert train.effective_lr(args, 4)[0] == pytest.approx(0.2)
        explicit = train.parse_args(["--config", path, "/some/imagenet", "--lr", "0.4"])
        assert train.effective_lr(explicit, 4) == (0.4, "given")  # an explicit --lr wins over the config's rule


def test_original_command_line_and_overrides():
    a = train.parse_args("/imagenet --model ddf_mul_resnet50 --lr 0.4 --warmup-epochs 5 --epochs 120 --sched cosine "
                         "-b 128 -j 6 --amp --dist-bn reduce".split())
    assert (a.data, a.model, a.lr, a.warmup_epochs, a.epochs, a.batch_size, a.workers, a.amp, a.dist_bn) == \
        ("/imagenet", "ddf_mul_resnet50", 0.4, 5, 120, 128, 6, True, "reduce")
    cfg = os.path.join(ROOT, "configs", "ablation_r50_se0.3.yaml")
    a = train.parse_args(["--config", cfg, "/x", "--lr", "0.1", "--model-kwargs", "filters=channel", "se_ratio=0.4"])
    assert a.lr == 0.1 and a.model_kwargs == {"se_ratio": 0.4, "filters": "channel"}
    a = train.parse_args("/imagenet --model ddf_mul_resnet50 --lr 0.4 -b 128".split())
    assert train.effective_lr(a, 8) == (0.4, "given")
    a = train.parse_args("/imagenet --model ddf_mul_resnet50 -b 128 --opt adamw --lr-base 0.001".split())
    assert train.effective_lr(a, 8)[0] == pytest.approx(0.001 * 2)  # timm: sqrt(1024 / 256) for Ada* optimizers
    a.lr_base_scale = "linear"
    assert train.effective_lr(a, 8)[0] == pytest.approx(0.001 * 4)
    a = train.parse_args([])  # no data: the demo config
    assert a.data is None and a.model == "ddf_mul_resnet_tiny" and a.config.endswith("demo.yaml")


def test_bad_config_and_apex_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet50\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        train.parse_args(["--config", str(bad), "/x"])
    with pytest.raises(ValueError, match="--apex-amp"):
        train.parse_args(["/x", "--apex-amp"])


def test_atomic_checkpoint_saver_keeps_top_k(tmp_path):
    saver = CheckpointSaver(str(tmp_path), top_k=2)
    for epoch, metric in enumerate([10.0, 30.0, 20.0, 25.0]):
        saver.save_epoch({"epoch": epoch, "w": torch.full((3,), float(epoch))}, epoch, metric)
    assert saver.best == (30.0, 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1.pth.tar", "checkpoint-3.pth.tar", "checkpoints.json",
                                            "last.pth.tar", "model_best.pth.tar"]
    assert load_checkpoint(str(tmp_path / "model_best.pth.tar"))["epoch"] == 1
    assert load_checkpoint(str(tmp_path / "last.pth.tar"))["epoch"] == 3
    assert CheckpointSaver(str(tmp_path), top_k=2).best == (30.0, 1)  # ranking survives a restart

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        save_checkpoint({"x": Boom()}, str(tmp_path / "last.pth.tar"))
    assert load_checkpoint(str(tmp_path / "last.pth.tar"))["epoch"] == 3  # old file intact, no temp left
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_timm_spellings_of_config_and_torchcompile_are_accepted():
    """timm's `-c` (for --config) and `--torchcompile` parse to the same options as ours."""
    import train
    cfg = os.path.join(os.path.dirname(train.__file__), "configs", "demo.yaml")
    a = train.parse_args(["-c", cfg, "--torchcompile", "eager"])
    assert a.config == cfg
    assert a.torch_compile == "eager"
    assert train.parse_args(["--config", cfg, "--torch-compile"]).torch_compile == "inductor"


def test_sync_bn_turns_dist_bn_off_as_in_timm():
    import train
    cfg = os.path.join(os.path.dirname(train.__file__), "configs", "demo.yaml")
    a = train.parse_args(["-c", cfg, "--dist-bn", "reduce"])
    assert train.dist_bn_mode(a, distributed=True) == "reduce"
    assert train.dist_bn_mode(a, distributed=False) == ""
    a.sync_bn = True
    assert train.dist_bn_mode(a, distributed=True) == ""
