#!/usr/bin/env python3
"""Train DDF-ResNets (or any timm model) on an ImageNet-style folder, or on the embedded demo dataset.

    python train.py                                   # demo: builds ./data/ddf_demo once, trains a tiny DDF-ResNet
    ./distributed_train.sh 8 /data/imagenet --model ddf_mul_resnet50 --lr 0.4 --warmup-epochs 5 --epochs 120 \
        --sched cosine -b 128 -j 6 --amp --dist-bn reduce
    python train.py --config configs/ddf_mul_resnet50.yaml /data/imagenet

Built from timm's library pieces (create_model, transforms, Mixup/CutMix, create_optimizer_v2,
create_scheduler_v2, ModelEmaV3, distribute_bn) plus our own loop, data checks, atomic checkpoints and resume.
See README.md, "Training and validation".
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import random
import signal
import sys
import time
from datetime import datetime
from types import SimpleNamespace
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

import timm
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import distribute_bn

try:
    from timm.utils import ModelEmaV3 as ModelEma
except ImportError:  # older timm
    from timm.utils import ModelEmaV2 as ModelEma

import models  # noqa: F401  (registers the DDF-ResNets with timm)
from training.checkpoint import CheckpointSaver, extract_state_dict, load_checkpoint_file
from training.common import (autocast_ctx, eval_transform, evaluate, fmt_time, make_grad_scaler, parse_kv,
                             resolve_amp, run_cli)
from training.data import DatasetError, ImageFolderDataset, ResumableSampler, collate_readable
from training.demo_data import DEFAULT_ROOT as DEMO_ROOT
from training.demo_data import build_demo_dataset

_logger = logging.getLogger("train")
HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(HERE, "configs", "demo.yaml")
CKPT_VERSION = 1


# ----------------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DDF-ResNet training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="", metavar="FILE",
                   help="YAML file of defaults (keys = option names); command-line options override it")
    g = p.add_argument_group("data")
    g.add_argument("data", nargs="?", default=None, metavar="DIR",
                   help="dataset root with train/<class>/*.jpeg and val/<class>/*.jpeg; omitted: the embedded demo")
    g.add_argument("--data-dir", dest="data_dir", default=None, help="same as the positional DIR")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--bad-image", default="skip", choices=("skip", "error"),
                   help="unreadable image: warn naming the file and use the next one, or stop with its path")
    g.add_argument("--demo-root", default=DEMO_ROOT, help="where the demo dataset is built/cached")
    g.add_argument("--demo-train-per-class", type=int, default=None)
    g.add_argument("--demo-val-per-class", type=int, default=None)
    g.add_argument("--demo-img-size", type=int, default=None)
    g.add_argument("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loader worker processes per rank")
    g.add_argument("--pin-mem", action="store_true", default=False)
    g.add_argument("--no-prefetcher", action="store_true", default=False, help="accepted for compatibility; no effect")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="ddf_mul_resnet50", help="timm model name, e.g. ddf_mul_resnet50")
    g.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra create_model kwargs, e.g. se_ratio=0.3 filters=channel normalization=batch_norm")
    g.add_argument("--pretrained", action="store_true", default=False)
    g.add_argument("--initial-checkpoint", default="", help="weights to start from (fine-tuning); not a resume")
    g.add_argument("--resume", default="", help="checkpoint to continue the same run from (last.pth.tar)")
    g.add_argument("--no-resume-opt", action="store_true", default=False,
                   help="on --resume restore only weights and epoch, not optimizer/scaler/EMA state")
    g.add_argument("--num-classes", type=int, default=None, help="default: number of class folders")
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N")
    g.add_argument("--crop-pct", type=float, default=None)
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument("--interpolation", default="", help="eval resize interpolation (default: model's)")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="batch size per process")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("--drop", type=float, default=0.0, help="classifier dropout")
    g.add_argument("--drop-path", type=float, default=None)
    g.add_argument("--channels-last", action="store_true", default=False)
    g.add_argument("--torch-compile", nargs="?", const="inductor", default=None, metavar="BACKEND")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", default="sgd")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--clip-grad", type=float, default=None, help="gradient clipping threshold")
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value"))
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", action="store_true", default=False, help="step the schedule every update")
    g.add_argument("--lr", type=float, default=None, help="learning rate; default lr-base * global batch / lr-base-size")
    g.add_argument("--lr-base", type=float, default=0.1)
    g.add_argument("--lr-base-size", type=int, default=256)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--epochs", type=int, default=120)
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--decay-epochs", type=float, default=90)
    g.add_argument("--decay-rate", type=float, default=0.1)

    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0))
    g.add_argument("--ratio", type=float, nargs=2, default=(3.0 / 4.0, 4.0 / 3.0))
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--aa", default=None, help="AutoAugment policy, e.g. rand-m9-mstd0.5")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--train-interpolation", default="random")
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    g = p.add_argument_group("batch norm, EMA, distributed")
    g.add_argument("--sync-bn", action="store_true", default=False, help="SyncBatchNorm (CUDA only)")
    g.add_argument("--dist-bn", default="reduce", choices=("", "reduce", "broadcast"),
                   help="after each epoch, average (reduce) or copy from rank 0 (broadcast) the BN statistics")
    g.add_argument("--model-ema", action="store_true", default=False)
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False)
    g.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)

    g = p.add_argument_group("precision and device")
    g.add_argument("--amp", action="store_true", default=False,
                   help="native torch.amp mixed precision (float16 + grad scaler on CUDA, bfloat16 on CPU)")
    g.add_argument("--native-amp", dest="amp", action="store_true", help="alias of --amp")
    g.add_argument("--apex-amp", action="store_true", default=False, help="not supported (apex); use --amp")
    g.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")

    g = p.add_argument_group("run, logging, checkpoints")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--deterministic", action="store_true", default=False,
                   help="deterministic algorithms and cudnn; with --seed a resumed run reproduces an uninterrupted one")
    g.add_argument("--output", default="output/train", help="parent folder of the run folder")
    g.add_argument("--experiment", default="", help="run folder name (default: <date>-<model>)")
    g.add_argument("--log-interval", type=int, default=50, help="progress line every N steps")
    g.add_argument("--checkpoint-hist", type=int, default=3, help="keep the top-k epoch checkpoints")
    g.add_argument("--checkpoint-interval", type=int, default=0,
                   help="also write last.pth.tar every N steps inside an epoch (mid-epoch resume)")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="save last.pth.tar and stop after N optimizer steps in total (simulated interruption)")
    g.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"))
    g.add_argument("--no-tensorboard", action="store_true", default=False)
    return p


def parse_args(argv: Optional[List[str]] = None):
    parser = build_parser()
    known, _ = build_parser().parse_known_args(argv)
    config_path = known.config
    if not config_path and known.data is None and known.data_dir is None and os.path.isfile(DEMO_CONFIG):
        config_path = DEMO_CONFIG  # `python train.py` with no data: the demo config
    cfg_model_kwargs: Dict = {}
    if config_path:
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"--config: file not found: {os.path.abspath(config_path)}")
        with open(config_path) as f:
            cfg = yaml.safe_load(f) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"--config {config_path}: expected a mapping of option: value, got {type(cfg).__name__}")
        dests = {a.dest for a in parser._actions}
        clean = {}
        for k, v in cfg.items():
            key = str(k).replace("-", "_")
            if key not in dests or key in ("config", "help"):
                raise ValueError(f"--config {config_path}: unknown option {k!r}")
            if key == "model_kwargs":
                if isinstance(v, dict):
                    cfg_model_kwargs = dict(v)
                    continue
                if v is None:
                    continue
                if not isinstance(v, (list, tuple, str)):
                    raise ValueError(f"--config {config_path}: model_kwargs must be a mapping or a list of key=value "
                                     f"strings, got {v!r}")
                cfg_model_kwargs = parse_kv([v] if isinstance(v, str) else v)
                continue
            clean[key] = v
        parser.set_defaults(**clean)
    args = parser.parse_args(argv)
    args.config = config_path
    args.model_kwargs = {**cfg_model_kwargs, **parse_kv(args.model_kwargs)}
    if args.data_dir and args.data and args.data_dir != args.data:
        parser.error(f"data given twice: {args.data!r} and --data-dir {args.data_dir!r}")
    args.data = args.data or args.data_dir
    args.data_dir = args.data
    if args.apex_amp:
        parser.error("--apex-amp: NVIDIA apex is not supported (obsolete); use --amp (native torch.amp, float16 + "
                     "GradScaler on CUDA) or --amp --amp-dtype bfloat16")
    for name in ("scale", "ratio"):
        setattr(args, name, tuple(getattr(args, name)))
    _check_values(parser, args)
    return args


# option -> (minimum, maximum, maximum included); values from a YAML config bypass argparse's type conversion
_RANGES = {"epochs": (1, None, True), "batch_size": (1, None, True), "workers": (0, None, True),
           "smoothing": (0.0, 1.0, False), "lr": (0.0, None, True), "warmup_epochs": (0, None, True),
           "checkpoint_hist": (0, None, True), "mixup": (0.0, None, True), "cutmix": (0.0, None, True),
           "drop_path": (0.0, 1.0, False), "model_ema_decay": (0.0, 1.0, True)}


def _check_values(parser: argparse.ArgumentParser, args) -> None:
    """One line naming the option and the allowed values for a value of the wrong type or out of range."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if value is None or action.type not in (int, float) or action.nargs not in (None, "?"):
            continue
        ok = isinstance(value, int) and not isinstance(value, bool) if action.type is int else \
            isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            kind = "an integer" if action.type is int else "a number"
            parser.error(f"{action.option_strings[-1]} must be {kind}, got {value!r}")
    for dest, (lo, hi, hi_incl) in _RANGES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if value < lo or (hi is not None and (value > hi or (value == hi and not hi_incl))):
            upper = "" if hi is None else (f" and <= {hi}" if hi_incl else f" and < {hi}")
            parser.error(f"--{dest.replace('_', '-')} must be >= {lo}{upper}, got {value!r}")


# ------------------------------------------------------------------------------------------------------- helpers
class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest swaps it between tests)."""

    def emit(self, record):
        self.stream = sys.stdout
        super().emit(record)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    for name in ("train", "ddf", "validate"):
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.propagate = False
        if not any(isinstance(h, _StdoutHandler) for h in lg.handlers):
            h = _StdoutHandler()
            h.setFormatter(logging.Formatter("%(message)s"))
            lg.addHandler(h)


def init_distributed(args):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(args.local_rank or 0)))
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    if want.startswith("cuda"):
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return distributed, world_size, rank, local_rank, device


def barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def rng_state() -> Dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except (RuntimeError, IndexError):
            _logger.warning("could not restore CUDA RNG state (different GPU count)")


def unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class RunLog:
    """Per-epoch summary.csv (appended across resumes) and TensorBoard scalars; rank 0 only."""

    def __init__(self, out_dir: str, tensorboard: bool = True):
        self.csv_path = os.path.join(out_dir, "summary.csv")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))
            except Exception as e:  # tensorboard not installed
                _logger.warning("TensorBoard logging disabled: %s", e)

    def epoch(self, row: Dict) -> None:
        exists = os.path.isfile(self.csv_path)
        rows = []
        if exists:  # drop a row of the same epoch written before an interruption/resume
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("epoch") != str(row["epoch"])]
        rows.append({k: row[k] for k in row})
        fields = list(row.keys())
        tmp = self.csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)
        os.replace(tmp, self.csv_path)
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def step(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# -------------------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    distributed, world_size, rank, local_rank, device = init_distributed(args)
    setup_logging(rank)
    det_before = torch.are_deterministic_algorithms_enabled()
    cudnn_before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        return _run(args, distributed, world_size, rank, device)
    finally:  # leave the process as found (train.main() is also called in-process by the tests)
        torch.use_deterministic_algorithms(det_before)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_before
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, distributed: bool, world_size: int, rank: int, device: torch.device) -> Dict:
    """The recipe: runtime -> data -> model -> optimiser -> resume -> loaders -> schedule -> output -> fit."""
    r = SimpleNamespace(args=args, distributed=distributed, world_size=world_size, rank=rank, device=device)
    _setup_runtime(r)
    _setup_data(r)
    _setup_model(r)
    _setup_optimizer(r)
    _resume(r)
    _wrap_model(r)
    _setup_loaders(r)
    _setup_schedule(r)
    _setup_output(r)
    return _fit(r)


def _setup_runtime(r) -> None:
    args, device = r.args, r.device
    if args.sync_bn and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); on CPU use --dist-bn reduce")
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)


def _setup_data(r) -> None:
    """Datasets (the demo one is built first when no data folder is given) and the class count."""
    args = r.args
    r.demo = args.data is None
    if r.demo:
        root = os.path.abspath(args.demo_root)
        if r.rank == 0:
            build_demo_dataset(root, train_per_class=args.demo_train_per_class, val_per_class=args.demo_val_per_class,
                               img_size=args.demo_img_size)
        barrier(r.distributed)
        args.data = args.data_dir = root
    r.data_root = args.data
    r.train_ds = ImageFolderDataset(r.data_root, args.train_split, None, bad_image=args.bad_image, seed=args.seed)
    r.val_ds = ImageFolderDataset(r.data_root, args.val_split, None, bad_image=args.bad_image, drop_bad=True)
    if r.train_ds.classes != r.val_ds.classes:
        missing = sorted(set(r.train_ds.classes) ^ set(r.val_ds.classes))
        raise DatasetError(f"class folders differ between {os.path.join(r.data_root, args.train_split)} and "
                           f"{os.path.join(r.data_root, args.val_split)}: {missing[:10]}")
    r.num_classes = args.num_classes or len(r.train_ds.classes)
    if r.num_classes < len(r.train_ds.classes):
        raise ValueError(f"--num-classes {r.num_classes} is smaller than the {len(r.train_ds.classes)} class folders "
                         f"in {os.path.join(r.data_root, args.train_split)}")
    args.num_classes = r.num_classes


def _setup_model(r) -> None:
    args = r.args
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=r.num_classes, drop_rate=args.drop,
                              **({"drop_path_rate": args.drop_path} if args.drop_path is not None else {}),
                              **args.model_kwargs)
    if args.initial_checkpoint:
        sd = extract_state_dict(load_checkpoint_file(args.initial_checkpoint))
        own = model.state_dict()
        mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
        for k in mismatched:  # e.g. a new classifier for another class count
            del sd[k]
        missing, unexpected = model.load_state_dict(sd, strict=False)
        _logger.info("initial checkpoint %s: %d tensors loaded; reinitialised %s; missing %s; unexpected %s",
                     args.initial_checkpoint, len(sd), mismatched or "none", list(missing) or "none",
                     list(unexpected) or "none")
    n_params = sum(p.numel() for p in model.parameters())
    r.data_config = resolve_data_config(vars(args), model=model, verbose=False)
    _logger.info("model %s: %.2fM params, kwargs %s, data config %s", args.model, n_params / 1e6, args.model_kwargs,
                 r.data_config)
    model.to(r.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if r.distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    r.model = model


def _setup_optimizer(r) -> None:
    args = r.args
    r.global_batch = args.batch_size * r.world_size
    r.lr = args.lr if args.lr is not None else args.lr_base * r.global_batch / args.lr_base_size
    args.lr_effective = r.lr
    opt_kwargs = {"eps": args.opt_eps} if args.opt_eps is not None else {}
    r.optimizer = create_optimizer_v2(r.model, opt=args.opt, lr=r.lr, weight_decay=args.weight_decay,
                                      momentum=args.momentum, **opt_kwargs)
    r.amp_dtype, r.amp_note = resolve_amp(r.device, args.amp, args.amp_dtype)
    r.autocast = autocast_ctx(r.device, r.amp_dtype)
    r.scaler = make_grad_scaler(r.device, r.amp_dtype)
    r.model_ema = None
    if args.model_ema:
        r.model_ema = ModelEma(r.model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)


def _resume(r) -> None:
    """--resume: weights, optimiser, scaler, EMA and the (epoch, step) position; checked against this run."""
    args = r.args
    r.start_epoch, r.start_step, r.resume_ckpt = 0, 0, None
    if not args.resume:
        return
    ckpt = r.resume_ckpt = load_checkpoint_file(args.resume)
    if ckpt.get("arch") and ckpt["arch"] != args.model:
        raise ValueError(f"--resume {args.resume} was trained as {ckpt['arch']!r} but --model is {args.model!r}")
    unwrap(r.model).load_state_dict(extract_state_dict(ckpt))
    r.start_epoch = int(ckpt.get("epoch", -1)) + 1
    r.start_step = int(ckpt.get("step", 0))
    if r.start_step:  # mid-epoch checkpoint: 'epoch' is the epoch in progress
        r.start_epoch -= 1
    _check_resume_shape(args, ckpt, _run_shape(args, r.world_size, len(r.train_ds)), r.start_step)
    if not args.no_resume_opt:
        if "optimizer" in ckpt:
            r.optimizer.load_state_dict(ckpt["optimizer"])
        if r.scaler is not None and ckpt.get("scaler"):
            r.scaler.load_state_dict(ckpt["scaler"])
        if r.model_ema is not None and ckpt.get("state_dict_ema"):
            unwrap(r.model_ema.module).load_state_dict(extract_state_dict(ckpt, use_ema=True))
    _logger.info("resumed from %s: epoch %d, step %d", args.resume, r.start_epoch, r.start_step)


def _wrap_model(r) -> None:
    if r.args.torch_compile:
        r.model = torch.compile(r.model, backend=r.args.torch_compile)
    if r.distributed:
        r.model = nn.parallel.DistributedDataParallel(
            r.model, device_ids=[r.device.index] if r.device.type == "cuda" else None)


def _setup_loaders(r) -> None:
    """Transforms, resumable samplers, loaders, mixup and the training loss."""
    args, world_size = r.args, r.world_size
    dc = r.data_config
    r.train_ds.transform = create_transform(dc["input_size"], is_training=True, scale=args.scale, ratio=args.ratio,
                                            hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
                                            auto_augment=args.aa, interpolation=args.train_interpolation,
                                            mean=dc["mean"], std=dc["std"], re_prob=args.reprob)
    r.val_ds.transform = eval_transform(dc)
    if args.batch_size > len(r.train_ds) // world_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(r.train_ds) // world_size} training "
                         f"images per process in {os.path.join(r.data_root, args.train_split)}")
    r.train_sampler = ResumableSampler(len(r.train_ds), shuffle=True, seed=args.seed, num_replicas=world_size,
                                       rank=r.rank)
    val_sampler = ResumableSampler(len(r.val_ds), shuffle=False, num_replicas=world_size, rank=r.rank, pad=False)
    loader_kw = dict(num_workers=args.workers, pin_memory=args.pin_mem and r.device.type == "cuda",
                     persistent_workers=False, worker_init_fn=_ignore_stop_signals if args.workers else None)
    # own generators: creating a loader iterator then draws no number from the global torch RNG, so a run resumed
    # mid-epoch sees the same RNG stream (drop-path, mixup) as an uninterrupted one
    r.train_loader = torch.utils.data.DataLoader(r.train_ds, batch_size=args.batch_size, sampler=r.train_sampler,
                                                 drop_last=True, generator=torch.Generator().manual_seed(args.seed),
                                                 **loader_kw)
    r.val_loader = torch.utils.data.DataLoader(r.val_ds, batch_size=args.validation_batch_size or args.batch_size,
                                               sampler=val_sampler, generator=torch.Generator().manual_seed(args.seed),
                                               collate_fn=collate_readable, **loader_kw)
    r.steps_per_epoch = int(math.ceil(len(r.train_ds) / world_size)) // args.batch_size
    r.mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        r.mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                           switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                           num_classes=r.num_classes)
        r.train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        r.train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        r.train_loss_fn = nn.CrossEntropyLoss()


def _setup_schedule(r) -> None:
    args = r.args
    if args.warmup_epochs and args.warmup_epochs >= args.epochs:
        _logger.warning("--warmup-epochs %d >= --epochs %d: warming up for %d epoch(s) instead", args.warmup_epochs,
                        args.epochs, args.epochs - 1)
        args.warmup_epochs = args.epochs - 1
    r.scheduler, r.num_epochs = create_scheduler_v2(
        r.optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=r.steps_per_epoch)
    if r.resume_ckpt is not None and not args.no_resume_opt and r.resume_ckpt.get("scheduler"):
        r.scheduler.load_state_dict(r.resume_ckpt["scheduler"])
    if args.sched_on_updates:
        r.scheduler.step_update(r.start_epoch * r.steps_per_epoch + r.start_step)
    else:
        r.scheduler.step(r.start_epoch)


def _setup_output(r) -> None:
    """The run folder (never an earlier run's), its saver and logs; train state and RNG of a resumed run."""
    args = r.args
    if args.experiment:
        out_dir = os.path.join(args.output, args.experiment)
    elif args.resume:
        out_dir = os.path.dirname(os.path.abspath(args.resume))
    else:
        out_dir = os.path.join(args.output, datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + args.model)
    out_dir = os.path.abspath(out_dir)
    if not args.resume:
        out_dir = _unused_run_dir(out_dir)
    r.out_dir, r.saver, r.runlog = out_dir, None, None
    if r.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "args.yaml"), "w") as f:
            yaml.safe_dump(_plain_args(args), f, sort_keys=True)
        r.saver = CheckpointSaver(out_dir, top_k=args.checkpoint_hist, decreasing=args.eval_metric == "loss")
        r.runlog = RunLog(out_dir, tensorboard=not args.no_tensorboard)
    _logger.info("output: %s | %d process(es) on %s | precision: %s | global batch %d, lr %.4g | %d epochs x %d "
                 "steps | %s", out_dir, r.world_size, r.device, r.amp_note, r.global_batch, r.lr, r.num_epochs,
                 r.steps_per_epoch, "demo dataset" if r.demo else r.data_root)
    r.eval_on_ema = r.model_ema is not None
    r.train_state = {"loss_sum": 0.0, "count": 0}
    ckpt = r.resume_ckpt
    if ckpt is not None:
        if r.start_step and ckpt.get("train_state"):
            r.train_state = dict(ckpt["train_state"])
        if ckpt.get("rng_state") is not None:
            rs = ckpt["rng_state"]
            set_rng_state(rs[r.rank] if isinstance(rs, list) and r.rank < len(rs) else rs if isinstance(rs, dict)
                          else rs[0])
    r.resume_ckpt = None


def _make_state(r, epoch: int, step: int, metrics: Optional[Dict] = None) -> Dict:
    args = r.args
    st = {
        "version": CKPT_VERSION, "arch": args.model, "args": _plain_args(args), "epoch": epoch, "step": step,
        "num_classes": r.num_classes, "class_names": r.train_ds.classes, "model_kwargs": dict(args.model_kwargs),
        "state_dict": unwrap(r.model).state_dict(), "optimizer": r.optimizer.state_dict(),
        "scheduler": r.scheduler.state_dict(), "scaler": r.scaler.state_dict() if r.scaler is not None else None,
        "state_dict_ema": unwrap(r.model_ema.module).state_dict() if r.model_ema is not None else None,
        "eval_on_ema": r.eval_on_ema, "data_config": dict(r.data_config),
        "run_shape": _run_shape(args, r.world_size, len(r.train_ds)),
    }
    if metrics is not None:
        st["metric"] = metrics[args.eval_metric]
        st["metrics"] = metrics
    return st


def _gather_rng(r) -> object:
    st = rng_state()
    if not r.distributed:
        return st
    out = [None] * r.world_size
    dist.all_gather_object(out, st)
    return out


def _install_stop_handlers(r) -> Dict:
    """SIGTERM/SIGINT set r.stopped (single process): the step finishes, last.pth.tar is written, the run ends."""
    r.stopped = {"flag": False, "signal": None}
    old = {}
    if r.distributed:
        return old

    def _on_signal(signum, frame):
        r.stopped.update(flag=True, signal=signum)
        _logger.warning("signal %d: saving last.pth.tar after this step and stopping", signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread
            pass
    return old


def _train_step(r, images, target) -> torch.Tensor:
    args = r.args
    images = images.to(r.device, non_blocking=True)
    target = target.to(r.device, non_blocking=True)
    if r.mixup_fn is not None:
        images, target = r.mixup_fn(images, target)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with r.autocast():
        output = r.model(images)
        loss = r.train_loss_fn(output.float(), target)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at epoch {r.epoch} step {r.i}; lower --lr or use "
                                 f"--clip-grad")
    r.optimizer.zero_grad(set_to_none=True)
    if r.scaler is not None:
        r.scaler.scale(loss).backward()
        if args.clip_grad is not None:
            r.scaler.unscale_(r.optimizer)
            _clip(r.model, args)
        r.scaler.step(r.optimizer)
        r.scaler.update()
    else:
        loss.backward()
        if args.clip_grad is not None:
            _clip(r.model, args)
        r.optimizer.step()
    if r.model_ema is not None:
        if _ema_takes_step():
            r.model_ema.update(unwrap(r.model), step=r.global_step)
        else:
            r.model_ema.update(unwrap(r.model))
    return loss


def _log_step(r, loss, seen: int, ep_t0: float) -> None:
    el = time.time() - ep_t0
    per_step = (time.time() - r.run_t0) / max(r.run_steps_done, 1)
    _logger.info("Train: %d [%4d/%d (%3.0f%%)]  loss %.4f (%.4f)  lr %.3e  %.1f img/s  ETA epoch %s  run %s",
                 r.epoch, r.i + 1, r.steps_per_epoch, 100.0 * (r.i + 1) / r.steps_per_epoch, loss.item(),
                 r.train_state["loss_sum"] / max(r.train_state["count"], 1), r.optimizer.param_groups[0]["lr"],
                 seen * r.world_size / max(el, 1e-9), fmt_time(per_step * (r.steps_per_epoch - r.i - 1)),
                 fmt_time(per_step * (r.total_steps - r.global_step)))
    r.runlog.step("train/loss", loss.item(), r.global_step)


def train_one_epoch(r, epoch: int) -> bool:
    """One epoch (from the resume step in the first one); True when the run was stopped mid-epoch."""
    args = r.args
    step0 = r.start_step if epoch == r.start_epoch else 0
    if step0 == 0:
        r.train_state = {"loss_sum": 0.0, "count": 0}
    r.train_sampler.set_epoch(epoch, start=step0 * args.batch_size)
    r.train_ds.set_epoch(epoch)
    r.model.train()
    r.epoch, ep_t0, seen = epoch, time.time(), 0
    for r.i, (images, target) in enumerate(r.train_loader, start=step0):
        loss = _train_step(r, images, target)
        r.global_step += 1
        r.run_steps_done += 1
        seen += images.shape[0]
        r.train_state["loss_sum"] += loss.item() * images.shape[0]
        r.train_state["count"] += images.shape[0]
        if args.sched_on_updates:
            r.scheduler.step_update(r.global_step)
        last_step = r.i + 1 == r.steps_per_epoch
        if r.rank == 0 and args.log_interval and ((r.i + 1) % args.log_interval == 0 or last_step):
            _log_step(r, loss, seen, ep_t0)
        want_stop = bool(args.stop_after_steps and r.global_step >= args.stop_after_steps and not last_step)
        want_stop = want_stop or r.stopped["flag"]
        periodic = bool(args.checkpoint_interval and (r.i + 1) % args.checkpoint_interval == 0 and not last_step)
        if want_stop or periodic:
            rng = _gather_rng(r)
            if r.rank == 0:
                st = _make_state(r, epoch, r.i + 1)
                st["train_state"] = dict(r.train_state)
                st["rng_state"] = rng
                r.saver.save_last(st)
                _logger.info("saved mid-epoch checkpoint %s (epoch %d, step %d)", r.saver.last_path, epoch, r.i + 1)
        if want_stop:
            return True
        if last_step:
            break
    r.epoch_time = time.time() - ep_t0
    return False


def _end_epoch(r, epoch: int) -> None:
    """Evaluate (model and EMA), step the epoch scheduler, save last/best/top-k, log the summary row."""
    args = r.args
    if r.distributed and args.dist_bn:
        distribute_bn(r.model, r.world_size, args.dist_bn == "reduce")
    ev = evaluate(r.model, r.val_loader, r.device, r.amp_dtype, args.channels_last, r.distributed)
    row = {"epoch": epoch, "train_loss": r.train_state["loss_sum"] / max(r.train_state["count"], 1),
           "eval_loss": ev["loss"], "eval_top1": ev["top1"], "eval_top5": ev["top5"],
           "lr": r.optimizer.param_groups[0]["lr"], "epoch_time_s": round(r.epoch_time, 2)}
    metrics = ev
    if r.model_ema is not None:
        if r.distributed and args.dist_bn:
            distribute_bn(r.model_ema, r.world_size, args.dist_bn == "reduce")
        ev_ema = evaluate(r.model_ema.module, r.val_loader, r.device, r.amp_dtype, args.channels_last, r.distributed)
        row.update({"ema_eval_loss": ev_ema["loss"], "ema_eval_top1": ev_ema["top1"], "ema_eval_top5": ev_ema["top5"]})
        metrics = ev_ema
    if not args.sched_on_updates:
        r.scheduler.step(epoch + 1, metrics[args.eval_metric])
    _logger.info("Epoch %d: train loss %.4f | val loss %.4f top-1 %.3f top-5 %.3f%s | %.1fs", epoch,
                 row["train_loss"], ev["loss"], ev["top1"], ev["top5"],
                 f" | EMA top-1 {row['ema_eval_top1']:.3f}" if r.model_ema is not None else "", row["epoch_time_s"])
    rng = _gather_rng(r)
    if r.rank == 0:
        st = _make_state(r, epoch, 0, {k: metrics[k] for k in ("loss", "top1", "top5")})
        st["rng_state"] = rng
        r.saver.save_epoch(st, epoch, metrics[args.eval_metric])
        r.runlog.epoch(row)
    r.metrics_hist.append(row)


def _fit(r) -> Dict:
    """The epochs; returns the result dict (and prints the final result line on rank 0)."""
    args = r.args
    old_handlers = _install_stop_handlers(r)
    r.metrics_hist = []
    r.global_step = r.start_epoch * r.steps_per_epoch + r.start_step
    r.total_steps = r.num_epochs * r.steps_per_epoch
    r.run_t0, r.run_steps_done = time.time(), 0
    interrupted = False
    for epoch in range(r.start_epoch, r.num_epochs):
        if train_one_epoch(r, epoch):
            interrupted = True
            break
        _end_epoch(r, epoch)
        if r.stopped["flag"] or (args.stop_after_steps and r.global_step >= args.stop_after_steps
                                 and epoch + 1 < r.num_epochs):
            interrupted = True
            break
    for sig, handler in old_handlers.items():
        signal.signal(sig, handler)
    result = {"output": r.out_dir, "interrupted": interrupted, "history": r.metrics_hist,
              "global_step": r.global_step, "signal": r.stopped["signal"]}
    if r.rank == 0:
        _report(r, result, interrupted)
    barrier(r.distributed)
    return result


def _report(r, result: Dict, interrupted: bool) -> None:
    saver = r.saver
    r.runlog.close()
    if saver.best is not None:
        result.update(best_metric=saver.best[0], best_epoch=saver.best[1], best_checkpoint=saver.best_path)
        name = "top-1" if r.args.eval_metric == "top1" else r.args.eval_metric
        if interrupted:
            _logger.info("stopped at step %d; resume with --resume %s", r.global_step, saver.last_path)
        print(f"best {name}: {saver.best[0]:.3f} (epoch {saver.best[1]}) checkpoint: {saver.best_path}", flush=True)
    elif interrupted:
        print(f"stopped at step {r.global_step} before the first epoch ended; resume with --resume "
              f"{saver.last_path}", flush=True)


def _ema_takes_step() -> bool:
    import inspect
    return "step" in inspect.signature(ModelEma.update).parameters


def _clip(model: nn.Module, args) -> None:
    params = [p for p in model.parameters() if p.grad is not None]
    if args.clip_mode == "norm":
        torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
    else:
        torch.nn.utils.clip_grad_value_(params, args.clip_grad)


_RUN_FILES = ("checkpoints.json", "summary.csv", "args.yaml", "last.pth.tar")


def _run_shape(args, world_size: int, train_images: int) -> Dict:
    """The settings that map a (epoch, step) position to the samples seen: checked when resuming."""
    return {"batch_size": int(args.batch_size), "world_size": int(world_size), "train_images": int(train_images)}


def _check_resume_shape(args, ckpt: Dict, now: Dict, start_step: int) -> None:
    """Refuse a resume that would silently skip or repeat samples: a different training set always; a different
    batch size or number of processes when resuming mid-epoch (at an epoch boundary they are allowed)."""
    saved = ckpt.get("run_shape")
    if saved is None:  # checkpoint of an older version: only its batch size is known
        old_args = ckpt.get("args") or {}
        saved = {"batch_size": old_args.get("batch_size")} if isinstance(old_args, dict) else {}
    keys = ["train_images"] + (["batch_size", "world_size"] if start_step else [])
    diff = [f"{k} {saved[k]} -> {now[k]}" for k in keys if saved.get(k) is not None and saved[k] != now[k]]
    if diff:
        where = "mid-epoch (step %d)" % start_step if start_step else "at an epoch boundary"
        raise ValueError(f"--resume {args.resume}: the run was saved {where} with different settings "
                         f"({', '.join(diff)}); resuming would skip or repeat samples. Resume with the original "
                         "settings, or start a new run from it with --initial-checkpoint")


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGINT: a scheduler signals the whole process group, and the main process
    (which handles them: finish the step, save last.pth.tar, exit) still needs its workers for that step."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _cli() -> None:
    """Command-line entry: exit status 128 + signal number after a SIGTERM/SIGINT stop (the run is saved)."""
    result = main()
    if isinstance(result, dict) and result.get("signal"):
        sys.exit(128 + int(result["signal"]))


def _unused_run_dir(out_dir: str) -> str:
    """``out_dir``, or ``out_dir-2``, ``-3``, ... when it already holds a run: an earlier run is never overwritten."""
    candidate, n = out_dir, 1
    while os.path.isdir(candidate) and any(os.path.exists(os.path.join(candidate, f)) for f in _RUN_FILES):
        n += 1
        candidate = f"{out_dir}-{n}"
    if candidate != out_dir:
        _logger.warning("%s holds an earlier run (use --resume to continue it); this run writes to %s", out_dir,
                        candidate)
    return candidate


def _plain_args(args) -> Dict:
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


if __name__ == "__main__":
    run_cli(_cli)
