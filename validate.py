#!/usr/bin/env python3
"""Evaluate top-1 / top-5 / loss of one or more models or checkpoints on a validation split.

    python validate.py --checkpoint output/demo/<run>/model_best.pth.tar     # demo val split, model from 'arch'
    python validate.py /data/imagenet --model ddf_mul_resnet50 --checkpoint ddf_mul_r50.pth
    python validate.py /data/imagenet --checkpoint a.pth.tar b.pth.tar --results-file results.csv

Checkpoints: ours (train.py; 'arch', 'args', 'state_dict', 'state_dict_ema'), timm-style training checkpoints,
a bare state dict (the released weights; then --model is required), or a .safetensors file of tools/release.py
(its metadata records model, classes and eval transform). See README.md, "Training and validation".
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from timm.data import create_transform, resolve_data_config

import models  # noqa: F401  (registers the DDF-ResNets with timm)
from ddf.backends import op_label
from training import cli, model_options
from ddf.state_dict import ema_chosen
from training.checkpoint import CheckpointError, load_checkpoint, unwrap_state_dict
from training.data import BAD_IMAGE_CHOICES, DatasetError, ResumableSampler, collate_skip, create_dataset
from training.demo_data import DEFAULT_ROOT as DEMO_ROOT
from training.demo_data import build_demo_dataset
from training.engine import evaluate
from training.io import atomic_write, check_output_file, claim_output_file, discard_if_empty
from training.release import read_release
from training.runtime import autocast_ctx, init_runtime, resolve_amp

_logger = logging.getLogger("validate")


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description="Validate DDF-ResNets / timm models",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", nargs="?", default=None, metavar="DIR",
                   help="dataset root with <split>/<class>/*.jpeg; omitted: the demo dataset's val split")
    p.add_argument("--data-dir", default=None, help="same as the positional DIR")
    p.add_argument("--dataset", default="", help="'' (image folder or <split>.tar) or hfds/<name>")
    p.add_argument("--split", default="val")
    p.add_argument("--model", nargs="+", default=None,
                   help="model name(s); optional when the checkpoint records 'arch'. One name applies to every "
                        "checkpoint, or give one per checkpoint")
    p.add_argument("--checkpoint", nargs="+", default=None, help="checkpoint file(s)")
    p.add_argument("--trust-checkpoint", action="store_true", default=False,
                   help="load checkpoints with full unpickling, which can run code from the file (default: "
                        "weights-only loading, which refuses such files)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="create_model kwargs (override those recorded in the checkpoint)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--use-ema", dest="use_ema", action="store_const", const=True, default=None,
                   help="evaluate the EMA weights (an error when the checkpoint has none). Default: the EMA weights "
                        "whenever the checkpoint holds them, the rule of every route (ddf.state_dict)")
    g.add_argument("--no-ema", dest="use_ema", action="store_const", const=False,
                   help="evaluate the plain (model) weights even when the checkpoint holds EMA weights")
    p.add_argument("--pretrained", action="store_true", default=False,
                   help="without --checkpoint: timm pretrained weights (where the model has a source)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="default: the checkpoint's (its channels rebuild the model: in_chans)")
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--interpolation", default="")
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--channels-last", action="store_true", default=False)
    p.add_argument("--amp", action="store_true", default=False,
                   help="native torch.amp autocast (float16 on CUDA by default, bfloat16 on CPU)")
    p.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--bad-image", default="skip", choices=BAD_IMAGE_CHOICES,
                   help="unreadable image: skip it (counted, not scored) or stop with its path")
    p.add_argument("--results-file", default="", help="write results as .csv or .json")
    p.add_argument("--log-interval", type=int, default=0)
    return p


def _num_classes_from_state_dict(sd: Dict[str, torch.Tensor]) -> Optional[int]:
    for key in ("fc.weight", "head.fc.weight", "classifier.weight", "head.weight"):
        if key in sd and sd[key].ndim == 2:
            return int(sd[key].shape[0])
    return None


def _demo_root_for(ckpt_args: Dict) -> str:
    """The demo dataset a checkpoint was trained on (built again if missing), or the default demo."""
    root = ckpt_args.get("demo_root") or DEMO_ROOT
    build_demo_dataset(root, train_per_class=ckpt_args.get("demo_train_per_class"),
                       val_per_class=ckpt_args.get("demo_val_per_class"), img_size=ckpt_args.get("demo_img_size"),
                       verbose=True)
    return os.path.abspath(root)


_WEIGHTS_LABEL = {"ema": "EMA", "model": "model"}


class ValidationFailed(RuntimeError):
    """Some checkpoints could not be evaluated; the results of the others were printed and written."""


def _checkpoint_info(ckpt_path: Optional[str], trust: bool = False) -> Dict:
    if ckpt_path and ckpt_path.lower().endswith(".safetensors"):  # tools/release.py's files (or any state dict)
        state_dict, info = read_release(ckpt_path)
        return {**info, "ckpt": state_dict}
    ckpt = load_checkpoint(ckpt_path, trust=trust) if ckpt_path else None
    if ckpt is not None and not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {os.path.abspath(ckpt_path)} holds a {type(ckpt).__name__}, not a dict")
    ckpt = ckpt or {}
    ckpt_args = ckpt.get("args") or {}
    if not isinstance(ckpt_args, dict):  # argparse.Namespace from timm's train.py
        ckpt_args = vars(ckpt_args)
    return {"ckpt": ckpt if ckpt_path else None, "args": ckpt_args, "arch": ckpt.get("arch"),
            "num_classes": ckpt.get("num_classes"), "class_names": ckpt.get("class_names"),
            "model_kwargs": dict(ckpt.get("model_kwargs") or {}), "data_config": ckpt.get("data_config"),
            "convert": ckpt.get("convert")}


def _check_classes(info: Dict, dataset, num_classes: int) -> None:
    names = info["class_names"]
    if names and list(names) != list(dataset.classes):
        raise DatasetError(f"classes of {dataset.source} differ from the classes the checkpoint was trained on: "
                           f"{sorted(set(names) ^ set(dataset.classes))[:10]}")
    if num_classes < len(dataset.classes):
        raise DatasetError(f"{dataset.source} has {len(dataset.classes)} classes but the model has {num_classes} "
                           f"outputs")


def _input_channels(args, info: Dict) -> int:
    """--input-size C, else the channels the checkpoint was trained with (its data_config / args), else 3."""
    if args.input_size is not None:
        return model_options.input_channels(args.input_size)
    for size in ((info["data_config"] or {}).get("input_size"), info["args"].get("input_size")):
        if size:
            return model_options.input_channels(size, "the checkpoint's input_size")
    return 3


def _build_model(args, model_name: str, info: Dict, state_dict, num_classes: int, ckpt_path: Optional[str] = None):
    kwargs = dict(info["model_kwargs"])
    cli_kwargs = cli.parse_kv(args.model_kwargs)
    kwargs.update(cli_kwargs)
    chans = _input_channels(args, info)
    if chans != 3:
        kwargs["in_chans"] = chans
    sources = {k: (f"--model-kwargs {k}={v!r}" if k in cli_kwargs else f"model_kwargs {k}={v!r} recorded in "
                   f"checkpoint {ckpt_path}") for k, v in kwargs.items()}
    sources["in_chans"] = ("--input-size " + " ".join(map(str, args.input_size)) if args.input_size
                           else f"{chans} input channels recorded in checkpoint {ckpt_path}")
    model = model_options.create_model(model_name, kwargs, sources, num_classes=num_classes,
                                       pretrained=args.pretrained and info["ckpt"] is None)
    if info.get("convert") is not None and not isinstance(info["convert"], dict):
        raise CheckpointError(f"checkpoint {os.path.abspath(ckpt_path or '')}: 'convert' must be the dict of "
                              f"ddf.convert settings train.py --convert records, got {info['convert']!r}")
    if info.get("convert"):  # train.py --convert: the same ddf.convert settings, recorded in full
        where = f"the --convert settings recorded in checkpoint {ckpt_path}"
        model, report = model_options.convert_model(model, model_name, info["convert"],
                                                    {k: where for k in info["convert"]})
        _logger.info("%s: converted as trained (%s)", model_name, model_options.convert_summary(report))
    if state_dict is not None:
        bad = model_options.state_dict_mismatch(model, state_dict)
        if bad:
            trained = f" (it records arch {info['arch']!r})" if info["arch"] and info["arch"] != model_name else ""
            raise CheckpointError(f"checkpoint {os.path.abspath(ckpt_path or '')} does not fit --model {model_name}"
                                  f"{trained}: {bad}; give the --model, --model-kwargs and --input-size it was trained with")
        model.load_state_dict(state_dict)
    elif not args.pretrained:
        _logger.warning("%s: no --checkpoint and no --pretrained: evaluating random weights", model_name)
    return model


def _data_config(args, info: Dict, model) -> Dict:
    chans = _input_channels(args, info)
    model_options.check_norm_lengths(args.mean, args.std, chans)
    cli_cfg = {"img_size": args.img_size, "input_size": args.input_size, "crop_pct": args.crop_pct,
               "interpolation": args.interpolation, "mean": args.mean, "std": args.std, "in_chans": chans}
    if info["data_config"]:
        return resolve_data_config(cli_cfg, pretrained_cfg=dict(info["data_config"]), model=model)
    return resolve_data_config(cli_cfg, model=model)


def _use_ema(asked: Optional[bool], info: Dict, ckpt_path: Optional[str]) -> bool:
    """Whether the EMA weights are evaluated: ``ddf.state_dict``'s rule (the EMA weights whenever the checkpoint
    holds them; --use-ema / --no-ema choose). A released .safetensors file holds one set, named in its metadata."""
    if info["ckpt"] is None:
        return False
    if "metadata" not in info:
        return ema_chosen(info["ckpt"], asked)
    recorded = str(info["metadata"].get("weights", ""))  # "ema", "plain", "average of N (ema)" ...
    ema = recorded == "ema" or recorded.endswith("(ema)")
    if asked is not None and asked != ema:
        raise ValueError(f"{'--use-ema' if asked else '--no-ema'}: {os.path.abspath(ckpt_path)} holds only the "
                         f"{'EMA' if ema else 'plain (model)'} weights")
    return ema


def validate_one(args, model_name: Optional[str], ckpt_path: Optional[str], device: torch.device) -> Dict:
    info = _checkpoint_info(ckpt_path, args.trust_checkpoint)
    if model_name is None:
        if not info["arch"]:
            raise ValueError(f"--model is required: checkpoint {ckpt_path} records no 'arch'")
        model_name = info["arch"]
    elif info["arch"] and info["arch"] != model_name:
        _logger.warning("checkpoint %s records arch %r; using --model %r", ckpt_path, info["arch"], model_name)
    ckpt = info["ckpt"]
    use_ema = _use_ema(args.use_ema, info, ckpt_path)
    state_dict = unwrap_state_dict(ckpt, use_ema=use_ema and "metadata" not in info) if ckpt is not None else None
    data_root = args.data if args.data is not None else _demo_root_for(info["args"])
    dataset = create_dataset(data_root, args.split, args.dataset, args.bad_image, substitute=False)
    num_classes = (args.num_classes or info["num_classes"] or
                   (_num_classes_from_state_dict(state_dict) if state_dict else None) or len(dataset.classes))
    _check_classes(info, dataset, num_classes)
    model = _build_model(args, model_name, info, state_dict, num_classes, ckpt_path)
    data_config = model_options.fit_channels(_data_config(args, info, model))
    dataset.channels = int(data_config["input_size"][0])  # 1: images decoded as 'L'
    dataset.transform = create_transform(data_config["input_size"], is_training=False,
                                         interpolation=data_config["interpolation"], mean=data_config["mean"],
                                         std=data_config["std"], crop_pct=data_config["crop_pct"])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_skip,
        sampler=ResumableSampler(len(dataset), shuffle=False, pad=False),
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype, amp_note = resolve_amp(device, args.amp, args.amp_dtype)
    t0 = time.time()
    m = evaluate(model, loader, device, autocast_ctx(device, amp_dtype), args.channels_last,
                 log_interval=args.log_interval, header=model_name)
    if m["count"] == 0:
        raise DatasetError(f"{dataset.source}: 0 images evaluated ({m['skipped']} unreadable skipped); no result for "
                           f"{ckpt_path or model_name}")
    return {"model": model_name, "checkpoint": os.path.abspath(ckpt_path) if ckpt_path else "",
            "weights": "ema" if use_ema else ("model" if ckpt is not None else
                                              ("pretrained" if args.pretrained else "random")),
            "top1": round(m["top1"], 4), "top5": round(m["top5"], 4), "loss": round(m["loss"], 6),
            "images": m["count"], "skipped": m["skipped"], "param_count": sum(p.numel() for p in model.parameters()),
            "img_size": data_config["input_size"][-1], "crop_pct": data_config["crop_pct"],
            "interpolation": data_config["interpolation"], "precision": amp_note,
            "img_per_s": round(m["count"] / max(time.time() - t0, 1e-9), 1), "data": dataset.source}


def print_best(results: List[Dict]) -> None:
    """The "best of N" line, only when every result was measured on the same images (same data, same count);
    otherwise say why no ranking is given."""
    sets = sorted({(r["data"], r["images"]) for r in results})
    if len(sets) > 1:
        print(f"not ranked: the {len(results)} results were measured on different data ("
              + "; ".join(f"{d}: {n} images" for d, n in sets) + ")", flush=True)
        return
    best = max(results, key=lambda r: r["top1"])
    print(f"best of {len(results)}: {best['model']} {best['checkpoint']} top-1: {best['top1']:.3f}", flush=True)


def read_results(path: str) -> List[Dict]:
    """The rows of an existing results file (empty or missing: none); ValueError when it is not one of ours, so
    such a file is kept and named before any work."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return []
    refused = (f"--results-file {path} exists and is not a validate.py results file; it is kept as it is: give "
               f"another file name")
    try:
        with open(path, newline="") as f:
            if path.lower().endswith(".json"):
                rows = json.load(f)
            else:
                reader = csv.DictReader(f)
                rows = list(reader) if "top1" in (reader.fieldnames or ()) else None
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:
        raise ValueError(f"{refused} ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        want = "a JSON list of rows" if path.lower().endswith(".json") else "a CSV with a top1 column"
        raise ValueError(f"{refused} (expected {want})")
    return rows


def write_results(path: str, results: List[Dict]) -> int:
    """Append ``results`` to the rows already in ``path`` (kept, never replaced); written atomically. Returns the
    number of earlier rows."""
    old = read_results(path)
    rows = old + list(results)
    if path.lower().endswith(".json"):
        atomic_write(path, json.dumps(rows, indent=2))
        return len(old)
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=fields, restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue())
    return len(old)


def claim_results_file(args) -> Optional[Tuple[str, bool]]:
    """Before any work: ``--results-file`` is created now (or, when it exists, checked to be a results file that
    the new rows are appended to). Returns (path, created by us) for :func:`discard_if_empty`, or None."""
    if not args.results_file:
        return None
    full, created = claim_output_file(args.results_file, "--results-file", suffixes=(".csv", ".json"))
    try:
        n = len(read_results(full))
    except ValueError:
        discard_if_empty(full, created)
        raise
    if n:
        _logger.info("--results-file %s holds %d earlier row(s): the new results are appended", full, n)
    return full, created


def parse_args(argv: Optional[List[str]] = None):
    args = build_parser().parse_args(argv)
    if args.data_dir and args.data and args.data_dir != args.data:
        raise cli.UsageError(f"data given twice: {args.data!r} and --data-dir {args.data_dir!r}")
    args.data = args.data or args.data_dir
    for name, lo, hi, lo_open in (("crop_pct", 0.0, 1.0, True), ("batch_size", 1, None, False),
                                  ("workers", 0, None, False), ("img_size", 1, None, False),
                                  ("input_size", 1, None, False), ("num_classes", 1, None, False),
                                  ("std", 0.0, None, True), ("mean", None, None, False),
                                  ("log_interval", 0, None, False)):
        cli.check_range(args, name, lo, hi, lo_open=lo_open)
    model_options.check_norm_lengths(args.mean, args.std, model_options.input_channels(args.input_size))
    model_options.check_interpolation(args.interpolation, "--interpolation")
    for name in args.model or ():
        model_options.check_model_name(name)
    if args.results_file:  # checked here, created (or checked to be ours) in main before any work
        check_output_file(args.results_file, "--results-file", suffixes=(".csv", ".json"))
    if args.use_ema is not None and not args.checkpoint:
        raise cli.UsageError(f"--{'use' if args.use_ema else 'no'}-ema needs --checkpoint (it chooses which weights "
                             f"of a checkpoint are evaluated)")
    if not args.checkpoint and not args.model:
        raise cli.UsageError("give --checkpoint FILE [FILE ...] and/or --model NAME [NAME ...]")
    ckpts, names = args.checkpoint or [], args.model or []
    if ckpts and names and len(names) not in (1, len(ckpts)):
        raise cli.UsageError(f"--model: give one name or one per checkpoint ({len(ckpts)}), got {len(names)}")
    return args


def _pairs(args):
    ckpts, names = args.checkpoint or [], args.model or []
    if ckpts:
        return [(names[0] if len(names) == 1 else (names[i] if names else None), c) for i, c in enumerate(ckpts)]
    return [(n, None) for n in names]


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    if not _logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        _logger.addHandler(h)
        _logger.setLevel(logging.INFO)
        _logger.propagate = False
    claimed = claim_results_file(args)
    try:
        return _validate_all(args, claimed[0] if claimed else "")
    finally:
        if claimed:
            discard_if_empty(*claimed)


def _validate_all(args, results_file: str) -> List[Dict]:
    device = init_runtime(args.device).device
    _logger.info("op: %s | device: %s", op_label(device), device)
    results, failed = [], []
    for model_name, ckpt_path in _pairs(args):
        try:
            r = validate_one(args, model_name, ckpt_path, device)
        except (CheckpointError, DatasetError, ValueError, RuntimeError) as e:
            if len(_pairs(args)) == 1:
                raise
            failed.append((ckpt_path or model_name, e))
            print(f"error: {ckpt_path or model_name}: {e}", file=sys.stderr, flush=True)
            continue
        results.append(r)
        skipped = f", {r['skipped']} unreadable image(s) skipped" if r["skipped"] else ""
        print(f"weights: {_WEIGHTS_LABEL.get(r['weights'], r['weights'])}", flush=True)
        print(f"{r['model']} [{r['weights']}] {r['checkpoint'] or ''} on {r['images']} images{skipped} "
              f"({r['img_size']}px, crop {r['crop_pct']}, {r['interpolation']}, {r['precision']}): "
              f"top-1: {r['top1']:.3f} top-5: {r['top5']:.3f} loss: {r['loss']:.4f}", flush=True)
    if results_file and results:
        earlier = write_results(results_file, results)
        print(f"results written to {results_file}" + (f" (appended after {earlier} earlier row(s))" if earlier
                                                         else ""), flush=True)
    if len(results) > 1:
        print_best(results)
    if failed:
        raise ValidationFailed(f"{len(failed)} of {len(failed) + len(results)} could not be evaluated: "
                               + "; ".join(f"{name} ({type(e).__name__})" for name, e in failed))
    return results


if __name__ == "__main__":
    cli.run_cli(main, errors=(ValidationFailed,))
