#!/usr/bin/env python3
"""Evaluate top-1 / top-5 / loss of one or more models or checkpoints on a validation split.

    python validate.py --checkpoint output/demo/<run>/model_best.pth.tar     # demo val split, model from 'arch'
    python validate.py /data/imagenet --model ddf_mul_resnet50 --checkpoint ddf_mul_r50.pth
    python validate.py /data/imagenet --checkpoint a.pth.tar b.pth.tar --results-file results.csv

Checkpoints: ours (train.py; 'arch', 'args', 'state_dict', 'state_dict_ema'), timm-style training checkpoints,
or a bare state dict (the released weights; then --model is required). See README.md, "Training and validation".
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
from typing import Dict, List, Optional

import torch

import timm
from timm.data import resolve_data_config

import models  # noqa: F401  (registers the DDF-ResNets with timm)
from training.checkpoint import atomic_write_bytes, extract_state_dict, load_checkpoint_file
from training.common import eval_transform, evaluate, parse_kv, resolve_amp, run_cli
from training.data import DatasetError, ImageFolderDataset, ResumableSampler, collate_readable
from training.demo_data import DEFAULT_ROOT as DEMO_ROOT
from training.demo_data import build_demo_dataset

_logger = logging.getLogger("validate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Validate DDF-ResNets / timm models",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", nargs="?", default=None, metavar="DIR",
                   help="dataset root with <split>/<class>/*.jpeg; omitted: the demo dataset's val split")
    p.add_argument("--data-dir", default=None, help="same as the positional DIR")
    p.add_argument("--split", default="val")
    p.add_argument("--model", nargs="+", default=None,
                   help="model name(s); optional when the checkpoint records 'arch'. One name applies to every "
                        "checkpoint, or give one per checkpoint")
    p.add_argument("--checkpoint", nargs="+", default=None, help="checkpoint file(s)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="create_model kwargs (override those recorded in the checkpoint)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--use-ema", dest="use_ema", action="store_const", const=True, default=None,
                   help="evaluate the EMA weights (default: when the checkpoint's best metric came from EMA)")
    g.add_argument("--no-ema", dest="use_ema", action="store_const", const=False)
    p.add_argument("--pretrained", action="store_true", default=False,
                   help="without --checkpoint: timm pretrained weights (where the model has a source)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N")
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--interpolation", default="")
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--channels-last", action="store_true", default=False)
    p.add_argument("--amp", action="store_true", default=False,
                   help="native torch.amp autocast (float16 on CUDA by default, bfloat16 on CPU)")
    p.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--bad-image", default="skip", choices=("skip", "error"))
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


def validate_one(args, model_name: Optional[str], ckpt_path: Optional[str], device: torch.device) -> Dict:
    ckpt = load_checkpoint_file(ckpt_path) if ckpt_path else None
    ckpt_args = (ckpt.get("args") if isinstance(ckpt, dict) else None) or {}
    if not isinstance(ckpt_args, dict):  # argparse.Namespace from timm's train.py
        ckpt_args = vars(ckpt_args)
    arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
    if model_name is None:
        if not arch:
            raise ValueError(f"--model is required: checkpoint {ckpt_path} records no 'arch'")
        model_name = arch
    elif arch and arch != model_name:
        _logger.warning("checkpoint %s records arch %r; using --model %r", ckpt_path, arch, model_name)

    use_ema = args.use_ema
    if use_ema is None:
        use_ema = bool(isinstance(ckpt, dict) and ckpt.get("eval_on_ema") and ckpt.get("state_dict_ema"))
    state_dict = extract_state_dict(ckpt, use_ema=use_ema) if ckpt is not None else None

    # data
    data_root = args.data
    if data_root is None:
        data_root = _demo_root_for(ckpt_args)
    dataset = ImageFolderDataset(data_root, args.split, None, bad_image=args.bad_image, drop_bad=True)

    num_classes = (args.num_classes or (ckpt.get("num_classes") if isinstance(ckpt, dict) else None)
                   or (_num_classes_from_state_dict(state_dict) if state_dict else None) or len(dataset.classes))
    class_names = ckpt.get("class_names") if isinstance(ckpt, dict) else None
    if class_names and list(class_names) != list(dataset.classes):
        raise DatasetError(f"class folders of {os.path.join(os.path.abspath(data_root), args.split)} differ from "
                           f"the classes the checkpoint was trained on: {sorted(set(class_names) ^ set(dataset.classes))[:10]}")
    if num_classes < len(dataset.classes):
        raise DatasetError(f"{os.path.join(os.path.abspath(data_root), args.split)} has {len(dataset.classes)} class "
                           f"folders but the model has {num_classes} outputs")

    model_kwargs = dict((ckpt.get("model_kwargs") if isinstance(ckpt, dict) else None) or {})
    model_kwargs.update(parse_kv(args.model_kwargs))
    model = timm.create_model(model_name, pretrained=args.pretrained and ckpt is None, num_classes=num_classes,
                              **model_kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    elif not args.pretrained:
        _logger.warning("%s: no --checkpoint and no --pretrained: evaluating random weights", model_name)

    cli = {"img_size": args.img_size, "input_size": args.input_size, "crop_pct": args.crop_pct,
           "interpolation": args.interpolation, "mean": args.mean, "std": args.std}
    ckpt_dc = ckpt.get("data_config") if isinstance(ckpt, dict) else None
    if ckpt_dc:
        data_config = resolve_data_config(cli, pretrained_cfg=dict(ckpt_dc), model=model)
    else:
        data_config = resolve_data_config(cli, model=model)
    dataset.transform = eval_transform(data_config)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers,
        sampler=ResumableSampler(len(dataset), shuffle=False, pad=False),
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0), collate_fn=collate_readable)

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype, amp_note = resolve_amp(device, args.amp, args.amp_dtype)
    t0 = time.time()
    m = evaluate(model, loader, device, amp_dtype, args.channels_last, log_interval=args.log_interval,
                 header=model_name)
    elapsed = time.time() - t0
    return {"model": model_name, "checkpoint": os.path.abspath(ckpt_path) if ckpt_path else "",
            "weights": "ema" if use_ema else ("checkpoint" if ckpt is not None else
                                              ("pretrained" if args.pretrained else "random")),
            "top1": round(m["top1"], 4), "top5": round(m["top5"], 4), "loss": round(m["loss"], 6),
            "images": m["count"], "skipped_images": m["skipped"], "param_count": sum(p.numel() for p in model.parameters()),
            "img_size": data_config["input_size"][-1], "crop_pct": data_config["crop_pct"],
            "interpolation": data_config["interpolation"], "precision": amp_note,
            "img_per_s": round(m["count"] / max(elapsed, 1e-9), 1), "data": os.path.abspath(data_root)}


def write_results(path: str, results: List[Dict]) -> None:
    """Results as .json or .csv, written atomically."""
    if path.lower().endswith(".json"):
        data = json.dumps(results, indent=2)
    elif path.lower().endswith(".csv"):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(results[0].keys()))
        w.writeheader()
        w.writerows(results)
        data = buf.getvalue()
    else:
        raise ValueError(f"--results-file must end in .csv or .json, got {path!r}")
    atomic_write_bytes(data.encode(), path)


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    args = build_parser().parse_args(argv)
    if args.data_dir and args.data and args.data_dir != args.data:
        raise ValueError(f"data given twice: {args.data!r} and --data-dir {args.data_dir!r}")
    args.data = args.data or args.data_dir
    if args.results_file and not args.results_file.lower().endswith((".csv", ".json")):
        raise ValueError(f"--results-file must end in .csv or .json, got {args.results_file!r}")
    if args.results_file:  # checked before any work
        folder = os.path.dirname(os.path.abspath(args.results_file))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"--results-file: folder {folder} does not exist or is not writable")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise ValueError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if not _logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        _logger.addHandler(h)
        _logger.setLevel(logging.INFO)
        _logger.propagate = False
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(want)

    ckpts = args.checkpoint or []
    names = args.model or []
    if not ckpts and not names:
        raise ValueError("give --checkpoint FILE [FILE ...] and/or --model NAME [NAME ...]")
    if ckpts and names and len(names) not in (1, len(ckpts)):
        raise ValueError(f"--model: give one name or one per checkpoint ({len(ckpts)}), got {len(names)}")
    if ckpts:
        pairs = [(names[0] if len(names) == 1 else (names[i] if names else None), c) for i, c in enumerate(ckpts)]
    else:
        pairs = [(n, None) for n in names]

    results, failed = [], []
    for model_name, ckpt_path in pairs:
        try:
            r = validate_one(args, model_name, ckpt_path, device)
        except (DatasetError, FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
            if len(pairs) == 1:
                raise
            failed.append((ckpt_path or model_name, exc))  # keep the others' results
            print(f"FAILED {ckpt_path or model_name}: {exc}", file=sys.stderr, flush=True)
            continue
        results.append(r)
        print(f"{r['model']} [{r['weights']}] {r['checkpoint'] or ''} on {r['images']} images "
              f"({r['img_size']}px, crop {r['crop_pct']}, {r['interpolation']}, {r['precision']}): "
              f"top-1: {r['top1']:.3f} top-5: {r['top5']:.3f} loss: {r['loss']:.4f}", flush=True)
    if args.results_file and results:
        write_results(args.results_file, results)
        print(f"results written to {os.path.abspath(args.results_file)}", flush=True)
    if len(results) > 1:
        best = max(results, key=lambda r: r["top1"])
        print(f"best of {len(results)}: {best['model']} {best['checkpoint']} top-1: {best['top1']:.3f}", flush=True)
    if failed:
        raise ValueError(f"{len(failed)} of {len(pairs)} checkpoint(s) could not be validated: "
                         + "; ".join(str(name) for name, _ in failed))
    return results


if __name__ == "__main__":
    run_cli(main)
