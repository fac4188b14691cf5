"""Issue 30 item 4 (rest) and the matching cases of its point 6: ``--input-size C H W`` builds a C-channel model and
data (and validate.py rebuilds it from the checkpoint), resuming a finished run changes nothing on disk, every value
passed on to timm is one ``error:`` line naming the option before any run folder exists, and validate.py with one
checkpoint of another architecture is one line. Tiny demo data, as tests/test_options.py."""
from __future__ import annotations

import os
import re

import pytest
import torch.nn as nn
from timm.models import register_model

import train
import validate
from training import cli
from training.checkpoint import load_checkpoint


def tiny_args(demo_root, out, name, *extra):
    return ["--demo-root", demo_root, "--demo-train-per-class", "8", "--demo-val-per-class", "4",
            "--demo-img-size", "32", "-b", "16", "--workers", "0", "--log-interval", "0", "--epochs", "1",
            "--warmup-epochs", "0", "--output", str(out), "--experiment", name, "--seed", "3", *extra]


def run_cli(main, argv, capsys):
    """(exit status, stderr) of ``main(argv)`` run as the scripts run it (training.cli.run_cli)."""
    capsys.readouterr()
    validate._logger.handlers = []  # validate.main() adds a stderr handler bound to the stream of its first call
    with pytest.raises(SystemExit) as exc:
        cli.run_cli(lambda: main(argv))
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The one ``error:`` line, last on stderr, no traceback (validate.py also logs to stderr before it)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    return errors[0]


def snapshot(folder: str):
    """Every file under ``folder``: (relative path, size, mtime_ns, bytes)."""
    out = []
    for d, _, files in os.walk(folder):
        for f in sorted(files):
            p = os.path.join(d, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out.append((os.path.relpath(p, folder), st.st_size, st.st_mtime_ns, fh.read()))
    return sorted(out)


# two models for the in_chans cases: one whose constructor has no in_chans, one that takes and ignores it
class _RGBNet(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, num_classes)
        self.pretrained_cfg = {"first_conv": "conv", "input_size": (3, 32, 32)}

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _model_kwargs(kwargs):  # without what timm's create_model adds (pretrained_cfg, ..., cache_dir)
    return {k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"}


@register_model
def opts_test_rgb_only(pretrained=False, num_classes=1000, drop_rate=0.0, **kwargs):
    return _RGBNet(num_classes, **_model_kwargs(kwargs))  # in_chans: TypeError


@register_model
def opts_test_ignores_in_chans(pretrained=False, num_classes=1000, drop_rate=0.0, **kwargs):
    return _RGBNet(num_classes)


# ------------------------------------------------------------- options passed on to timm: refused at parse time
REFUSED = [
    (["--aa", "garbage-m9"], r"error: --aa 'garbage-m9' is not an AutoAugment policy timm knows"),
    (["-b", "7", "--mixup", "0.2"], r"error: -b/--batch-size 7 must be even with --mixup"),
    (["-b", "15", "--cutmix", "1.0"], r"error: -b/--batch-size 15 must be even with --cutmix"),
    (["--model-kwargs", "foo=1"], r"error: --model-kwargs foo=1: model 'ddf_mul_resnet_tiny' takes no argument 'foo'"),
    (["--model-kwargs", "filters=bogus"], r"error: --model 'ddf_mul_resnet_tiny' cannot be built with --model-kwargs "
                                          r"filters='bogus': ValueError: DDFPack: filters must be one of"),
    (["--interpolation", "bogus"], r"error: --interpolation must be one of nearest, bilinear, bicubic, .*got 'bogus'"),
    (["--train-interpolation", "bogus"], r"error: --train-interpolation must be one of .*random, got 'bogus'"),
    (["--model", "no_such_model"], r"error: --model 'no_such_model': no such timm model"),
    (["--input-size", "2", "32", "32"], r"error: --input-size 2 32 32: .* must be 1 \(grayscale\) or 3 \(RGB\)"),
    (["--input-size", "1", "32", "32", "--mean", "0.5", "0.4", "0.4"], r"error: --mean needs 1 value \(--input-size 1"),
    (["--input-size", "1", "32", "32", "--model", "opts_test_rgb_only"],
     r"error: --input-size 1 32 32: model 'opts_test_rgb_only' cannot be built for 1 input channels"),
    (["--input-size", "1", "32", "32", "--model", "opts_test_ignores_in_chans"],
     r"error: --input-size 1 32 32: model 'opts_test_ignores_in_chans' was asked for 1 input channels but its "
     r"first conv takes 3"),
    (["--model-kwargs", "in_chans=1"], r"error: --model-kwargs in_chans=1: give the input channels as --input-size"),
]


@pytest.mark.parametrize("extra,match", REFUSED, ids=[" ".join(a)[:40] for a, _ in REFUSED])
def test_train_timm_options_refused_before_any_run_folder(demo_root, tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.setattr(train, "prepare_output", lambda *a: pytest.fail("got past the option checks"))
    code, err = run_cli(train.main, tiny_args(demo_root, tmp_path / "out", "x", *extra), capsys)
    assert code == 2
    assert re.match(match, one_error_line(err)), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("yaml_text,match", [
    ("model: 5\n", r"error: --model '5': no such timm model"),
    ("model: ddf_mul_resnet_tiny\nmodel_kwargs: {foo: 1}\n",
     r"error: --config \S+c\.yaml: model_kwargs foo=1: model 'ddf_mul_resnet_tiny' takes no argument 'foo'"),
], ids=["model-5", "model_kwargs-foo"])
def test_train_yaml_model_and_model_kwargs_refused(tmp_path, capsys, yaml_text, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    code, err = run_cli(train.main, ["--config", str(cfg), str(tmp_path / "data"), "--output", str(tmp_path / "o")],
                        capsys)
    assert code == 2 and re.match(match, one_error_line(err)), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,match", [
    (["--model", "no_such_model"], r"error: --model 'no_such_model': no such timm model"),
    (["--interpolation", "bogus"], r"error: --interpolation must be one of"),
    (["--model-kwargs", "foo=1"], r"error: --model-kwargs foo=1: model 'ddf_mul_resnet_tiny' takes no argument"),
], ids=["model", "interpolation", "model-kwargs"])
def test_validate_timm_options_are_one_line(demo_root, capsys, extra, match):
    argv = [demo_root, "--model", "ddf_mul_resnet_tiny", "--img-size", "32", "--workers", "0", *extra]
    code, err = run_cli(validate.main, argv, capsys)
    assert code == 2 and re.match(match, one_error_line(err)), err


# --------------------------------------------------------------------------- --input-size 1 H W: a grey model
@pytest.fixture(scope="module")
def grey_run(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("grey")
    res = train.main(tiny_args(demo_root, out, "grey", "--input-size", "1", "32", "32"))
    return str(out), os.path.join(str(out), "grey"), res


def test_input_size_one_channel_builds_a_grey_model_and_data(grey_run):
    _, run, res = grey_run
    ckpt = load_checkpoint(os.path.join(run, "model_best.pth.tar"))
    assert ckpt["state_dict"]["conv1.0.weight"].shape == (16, 1, 3, 3)  # old main: (16, 3, 3, 3)
    cfg = ckpt["data_config"]
    assert tuple(cfg["input_size"]) == (1, 32, 32) and ckpt["args"]["input_size"] == [1, 32, 32]
    # the RGB defaults become the luma-weighted average: one value each, as the 'L' images have one channel
    assert cfg["mean"] == (pytest.approx(0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406, abs=1e-4),)
    assert len(cfg["std"]) == 1 and 0.2 < cfg["std"][0] < 0.25
    assert res["best_epoch"] == 0  # the 1-channel conv trained and evaluated: the loaders gave 1-channel images


def test_validate_rebuilds_the_grey_model_from_the_checkpoint(grey_run, capsys):
    _, run, res = grey_run
    best = os.path.join(run, "model_best.pth.tar")
    r = validate.main(["--checkpoint", best, "--workers", "0"])[0]
    assert f"{r['top1']:.3f}" == f"{res['best_metric']:.3f}" and r["images"] == 40
    r = validate.main(["--checkpoint", best, "--workers", "0", "--img-size", "32"])[0]  # channels stay 1
    assert f"{r['top1']:.3f}" == f"{res['best_metric']:.3f}"
    code, err = run_cli(validate.main, ["--checkpoint", best, "--workers", "0", "--input-size", "3", "32", "32"],
                        capsys)
    assert code == 2 and one_error_line(err).startswith(f"error: checkpoint {best} does not fit --model "
                                                        f"ddf_mul_resnet_tiny: 1 tensor(s) differ in shape (first: "
                                                        f"conv1.0.weight [16, 1, 3, 3] in the file, [16, 3, 3, 3]")


# ------------------------------------------------------------------------------- validate: another architecture
def test_validate_one_checkpoint_of_another_architecture_is_one_line(grey_run, capsys):
    _, run, _ = grey_run
    best = os.path.join(run, "model_best.pth.tar")
    code, err = run_cli(validate.main, ["--checkpoint", best, "--model", "ddf_mul_resnet18", "--workers", "0"],
                        capsys)
    line = one_error_line(err)
    assert code == 2  # old main: RuntimeError size-mismatch traceback
    assert line.startswith(f"error: checkpoint {best} does not fit --model ddf_mul_resnet18 (it records arch "
                           f"'ddf_mul_resnet_tiny'): ")
    assert "differ in shape" in line and "missing key(s)" in line and "unexpected key(s)" in line


# ------------------------------------------------------------------------------------ resuming a finished run
def test_resume_of_a_finished_run_says_so_and_changes_nothing(demo_root, grey_run, capsys):
    out, run, _ = grey_run
    before = snapshot(out)
    argv = tiny_args(demo_root, out, "grey", "--input-size", "1", "32", "32", "--resume",
                     os.path.join(run, "last.pth.tar"))
    code, err = run_cli(train.main, argv, capsys)
    assert code == 2  # old main: 0, no word, args.yaml rewritten
    assert one_error_line(err) == (f"error: --resume {run}/last.pth.tar: the run already finished 1 epoch(s) "
                                   f"(--epochs 1); nothing to do, nothing written (raise --epochs to train more: "
                                   f"that starts a new run folder and leaves this one as it is)")
    assert snapshot(out) == before and os.listdir(out) == ["grey"]
    # an epoch-end checkpoint of another file name (model_best) is refused the same way
    argv[-1] = os.path.join(run, "model_best.pth.tar")
    code, err = run_cli(train.main, argv, capsys)
    assert code == 2 and "already finished 1 epoch(s)" in one_error_line(err)
    assert snapshot(out) == before


def test_resume_with_other_input_channels_is_one_line(demo_root, grey_run, tmp_path, capsys):
    _, run, _ = grey_run
    argv = tiny_args(demo_root, tmp_path, "more", "--epochs", "2", "--resume", os.path.join(run, "last.pth.tar"))
    code, err = run_cli(train.main, argv, capsys)
    assert code == 2 and one_error_line(err).startswith(
        f"error: --resume {run}/last.pth.tar: its weights do not fit --model ddf_mul_resnet_tiny as built now (1 "
        f"tensor(s) differ in shape (first: conv1.0.weight [16, 1, 3, 3] in the file, [16, 3, 3, 3] in the model)")
