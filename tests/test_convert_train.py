"""Issue 26 item 2: ``train.py --convert`` (YAML ``convert: true``) trains a timm model converted by ``ddf.convert``;
the full conversion settings are stored in the checkpoint, so ``validate.py --checkpoint`` rebuilds the same model
and ``--resume`` reconverts identically; bad convert options (and a model with nothing eligible) are one ``error:``
line naming the option, exit 2, before any run folder exists. timm's resnet10t on the tiny 32 px demo."""
from __future__ import annotations

import csv
import json
import os
import re

import pytest
import torch
import yaml
from timm.models import register_model

import ddf
import train
import validate
from training.checkpoint import load_checkpoint
from test_options_timm import one_error_line, run_cli, snapshot

MODEL = "resnet10t"
CONVERT = ("--convert", "--convert-kwargs", "include=layer[234].*", "head=2")
SETTINGS = {"include": "layer[234].*", "exclude": None, "min_channels": 1, "policy": "paper", "kernel_combine": "mul",
            "head": 2, "se_ratio": 0.2, "normalization": "filter_norm", "filters": "both", "nonlinearity": "relu"}


def tiny_args(demo_root, out, name, *extra):
    # 80 train images / batch 16 = 5 steps per epoch; the demo config supplies the schedule
    return ["--demo-root", demo_root, "--demo-train-per-class", "8", "--demo-val-per-class", "4",
            "--demo-img-size", "32", "-b", "16", "--workers", "0", "--log-interval", "0", "--epochs", "2",
            "--warmup-epochs", "1", "--output", str(out), "--experiment", name, "--seed", "3", "--deterministic",
            "--no-tensorboard", "--model", MODEL, *extra]


@pytest.fixture(scope="module")
def full_run(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv")
    res = train.main(tiny_args(demo_root, out, "full", *CONVERT))
    return str(out), res


def test_converted_run_records_the_full_settings_and_trains_ddf_layers(full_run):
    out, res = full_run
    run = os.path.join(out, "full")
    best = load_checkpoint(os.path.join(run, "model_best.pth.tar"))
    assert best["convert"] == SETTINGS  # policy 'auto' resolved to 'paper' (a timm ResNet), defaults explicit
    assert best["args"]["convert"] is True and best["args"]["convert_kwargs"] == SETTINGS
    with open(os.path.join(run, "args.yaml")) as f:
        assert yaml.safe_load(f)["convert_kwargs"] == SETTINGS
    sd = best["state_dict"]
    assert "layer1.0.conv2.weight" in sd  # layer1 left out by include: still a conv
    assert "layer2.0.conv2.weight" not in sd and "layer4.0.conv2.channel_branch.1.weight" in sd
    reference, report = ddf.convert(__import__("timm").create_model(MODEL, num_classes=10), input_size=None,
                                    include="layer[234].*", head=2, policy="paper")
    assert report.count == 3 and set(sd) == set(reference.state_dict())
    with open(os.path.join(run, "summary.csv")) as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]
    assert res["global_step"] == 10 and res["best_checkpoint"]


def test_the_conversion_is_logged_with_its_report(demo_root, tmp_path, capsys):
    capsys.readouterr()
    train.main(tiny_args(demo_root, tmp_path, "log", "--convert", "--epochs", "1", "--warmup-epochs", "0"))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("--convert ")]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "'policy': 'paper'" in line and "replaced 5 convs by DDF layers" in line
    m = re.search(r"params: ([\d,]+) -> ([\d,]+); FLOPs \(paper convention, input 1x3x32x32\): ([\d,]+) -> ([\d,]+)",
                  line)
    assert m, line
    before, after = (int(m.group(i).replace(",", "")) for i in (1, 2))
    assert before > after > 0  # resnet10t 10 classes: 4,927,618 -> 2,485,369


def test_validate_rebuilds_the_converted_model_from_the_checkpoint(full_run):
    out, res = full_run
    r = validate.main(["--checkpoint", res["best_checkpoint"], "--workers", "0"])[0]  # old main: key mismatch
    assert r["model"] == MODEL and r["images"] == 40
    assert f"{r['top1']:.3f}" == f"{res['best_metric']:.3f}"
    assert r["param_count"] == sum(v.numel() for k, v in load_checkpoint(res["best_checkpoint"])["state_dict"].items()
                                   if "running_" not in k and "num_batches" not in k)


def test_a_release_of_the_converted_run_validates_to_its_top1(full_run, tmp_path):
    from training import release

    out, res = full_run
    rel = release.from_source(os.path.join(out, "full"))
    assert json.loads(rel.metadata["convert"]) == SETTINGS
    path = release.write_release(rel, str(tmp_path))[0]  # .safetensors: the weights and what rebuilds the model
    r = validate.main(["--checkpoint", path, "--workers", "0"])[0]  # before: missing / unexpected keys
    assert r["model"] == MODEL and f"{r['top1']:.3f}" == f"{res['best_metric']:.3f}"


def test_initial_checkpoint_of_a_converted_run_loads_into_the_converted_model(demo_root, full_run, tmp_path, capsys):
    out, res = full_run
    capsys.readouterr()
    train.main(tiny_args(demo_root, tmp_path, "ft", *CONVERT, "--initial-checkpoint", res["best_checkpoint"],
                         "--epochs", "1", "--warmup-epochs", "0"))
    n = len(load_checkpoint(res["best_checkpoint"])["state_dict"])
    assert f": {n} of {n} tensors loaded; reinitialised none; missing none; unexpected none" in capsys.readouterr().out


def _states_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k


def test_resume_reconverts_identically_and_refuses_another_conversion(demo_root, full_run, tmp_path, capsys):
    out, full = full_run
    part = train.main(tiny_args(demo_root, out, "part", *CONVERT, "--stop-after-steps", "7"))
    assert part["interrupted"] and part["global_step"] == 7
    last = os.path.join(out, "part", "last.pth.tar")
    before = snapshot(os.path.join(out, "part"))
    for extra, said in [((), "but this command asks for no --convert"),
                        (("--convert",), "but this command asks for --convert with {'include': None"),
                        (CONVERT + ("se_ratio=0.25",), "'se_ratio': 0.25")]:
        code, err = run_cli(train.main, tiny_args(demo_root, out, "part", *extra, "--resume", last), capsys)
        line = one_error_line(err)
        assert code == 2 and line.startswith(f"error: --resume {last}: the run was trained with --convert with "
                                             f"{SETTINGS}"), line
        assert said in line and line.endswith("resume with the run's own --convert / --convert-kwargs")
    assert snapshot(os.path.join(out, "part")) == before  # nothing written by the refused resumes
    resumed = train.main(tiny_args(demo_root, out, "part", *CONVERT, "--resume", last))
    assert resumed["global_step"] == full["global_step"] == 10
    a = load_checkpoint(os.path.join(out, "full", "last.pth.tar"))
    b = load_checkpoint(last)
    assert b["convert"] == SETTINGS and (b["epoch"], b["step"]) == (1, 0)
    _states_close(a["state_dict"], b["state_dict"])  # the same run as the uninterrupted one


def test_yaml_convert_key_and_auto_policy_on_a_non_resnet(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: resnet10t\nconvert: true\nconvert_kwargs: {min_channels: 128, kernel_combine: add}\n")
    args = train.parse_args(["--config", str(cfg), str(tmp_path / "data")])
    assert args.convert and args.convert_kwargs == {**SETTINGS, "include": None, "head": 1, "min_channels": 128,
                                                    "kernel_combine": "add"}
    cfg.write_text("model: resnet10t\nconvert: true\nconvert_kwargs: [head=4, 'exclude=layer4.*']\n")
    args = train.parse_args(["--config", str(cfg), str(tmp_path / "data"), "--convert-kwargs", "head=2"])
    assert (args.convert_kwargs["head"], args.convert_kwargs["exclude"]) == (2, "layer4.*")  # the CLI wins
    args = train.parse_args([str(tmp_path / "data"), "--model", "mobilenetv3_small_050", "--convert"])
    assert args.convert_kwargs["policy"] == "all"  # auto: every eligible conv where the paper layout does not apply
    args = train.parse_args([str(tmp_path / "data"), "--model", MODEL, "--convert", "--convert-kwargs", "policy=None",
                             "include=['layer3.*', 'conv1.*']"])
    assert args.convert_kwargs["policy"] == "all" and args.convert_kwargs["include"] == ["layer3.*", "conv1.*"]
    assert not train.parse_args([str(tmp_path / "data"), "--model", MODEL]).convert


class _NeedsRealInit(torch.nn.Module):
    """Its __init__ reads a tensor value: it cannot be built on the meta device (the option check builds it for real)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        width = int(torch.tensor(8.0).sum().item())
        self.stem, self.conv = torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.Conv2d(width, width, 3, padding=1)
        self.fc = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.conv(self.stem(x)).mean((2, 3)))


@register_model
def convtrain_test_needs_real_init(pretrained=False, num_classes=1000, **kwargs):
    return _NeedsRealInit(num_classes)


def test_convert_options_checked_on_a_model_that_cannot_be_built_on_meta(tmp_path):
    args = train.parse_args([str(tmp_path / "data"), "--model", "convtrain_test_needs_real_init", "--convert"])
    assert args.convert_kwargs["policy"] == "all"


REFUSED = [
    (["--convert", "--convert-kwargs", "foo=1"],
     r"error: --convert-kwargs foo=1: ddf.convert has no option 'foo' \(options: exclude, filters, head, include,"),
    (["--convert", "--convert-kwargs", "head=0"], r"error: --convert-kwargs head=0: ddf.convert: head must be >= 1"),
    (["--convert", "--convert-kwargs", "kernel_combine=max"],
     r"error: --convert-kwargs kernel_combine='max': ddf.convert: kernel_combine must be one of \('mul', 'add'\)"),
    (["--convert", "--convert-kwargs", "se_ratio=-1"], r"error: --convert-kwargs se_ratio=-1: .*must be a number > 0"),
    (["--convert", "--convert-kwargs", "min_channels=0"], r"error: --convert-kwargs min_channels=0: .*must be >= 1"),
    (["--convert", "--convert-kwargs", "policy=some"],
     r"error: --convert-kwargs policy='some': policy must be one of auto, paper, all"),
    (["--convert", "--convert-kwargs", "policy=paper", "--model", "mobilenetv3_small_050"],
     r"error: --convert-kwargs policy='paper': ddf.convert: policy='paper' is the DDF-ResNet layout .*MobileNetV3"),
    (["--convert", "--convert-kwargs", "include=5"], r"error: --convert-kwargs include=5: must be an fnmatch pattern"),
    (["--convert-kwargs", "head=2"], r"error: --convert-kwargs head=2: convert options without --convert"),
    (["--convert", "--convert-kwargs", "include=nomatch*"],
     r"error: --convert: nothing eligible in model 'resnet10t' with include='nomatch\*' \(11 k x k conv\(s\) kept; "
     r"first: layer1.0.conv1: not matched by include\); drop --convert or change --convert-kwargs"),
    (["--convert", "--model", "vit_tiny_patch16_224"],
     r"error: --convert: nothing eligible in model 'vit_tiny_patch16_224' \(1 k x k conv\(s\) kept; first: "
     r"patch_embed.proj: kernel 16x16"),
]


@pytest.mark.parametrize("extra,match", REFUSED, ids=[" ".join(a)[10:50] for a, _ in REFUSED])
def test_bad_convert_options_are_one_line_before_any_run_folder(demo_root, tmp_path, capsys, monkeypatch, extra,
                                                                match):
    monkeypatch.setattr(train, "prepare_output", lambda *a: pytest.fail("got past the option checks"))
    code, err = run_cli(train.main, tiny_args(demo_root, tmp_path / "out", "x", *extra), capsys)
    assert code == 2 and re.match(match, one_error_line(err)), err
    assert not (tmp_path / "out").exists()


def test_bad_yaml_convert_kwargs_name_the_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: resnet10t\nconvert: true\nconvert_kwargs: {head: 0}\n")
    code, err = run_cli(train.main, ["--config", str(cfg), str(tmp_path / "data"), "--output", str(tmp_path / "o")],
                        capsys)
    assert code == 2 and re.match(r"error: --config \S+c\.yaml: convert_kwargs head=0: ddf.convert: head must be",
                                  one_error_line(err)), err
    cfg.write_text("model: resnet10t\nconvert_kwargs: 5\n")
    code, err = run_cli(train.main, ["--config", str(cfg), str(tmp_path / "data")], capsys)
    assert code == 2 and "convert_kwargs must be a mapping (key: value) or a list of key=value" in one_error_line(err)
    assert not (tmp_path / "o").exists()
