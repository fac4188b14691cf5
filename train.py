#!/usr/bin/env python3
"""Train DDF-ResNets (or any timm model) on an ImageNet-style dataset, or on the embedded demo dataset.

    python train.py                                   # demo: builds ./data/ddf_demo once, trains a tiny DDF-ResNet
    ./distributed_train.sh 8 /data/imagenet --model ddf_mul_resnet50 --lr 0.4 --warmup-epochs 5 --epochs 120 \\
        --sched cosine -b 128 -j 6 --amp --dist-bn reduce
    python train.py --config configs/ddf_mul_resnet50.yaml /data/imagenet

The recipe: arguments -> data -> model -> optimiser and schedule -> fit -> result line. The machinery (verified
checkpoints, readers and the resumable sampler, distributed set-up, signals, the loop) is in ``training/``.
See README.md, "Training and validation".
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from datetime import datetime
from types import SimpleNamespace
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.distributed as dist
import yaml

from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, unwrap_model

import models  # noqa: F401  (registers the DDF-ResNets with timm)
from ddf.backends import BACKENDS, require_compiled, use_backend
from training import cli, data as tdata, model_options, run_folder, runtime
from training.checkpoint import (LAST_NAME, CheckpointSaver, checkpoint_dict, continues_in_place, is_run_folder,
                                 load_checkpoint, recover_run_folder, unwrap_state_dict)
from training.demo_data import DEFAULT_ROOT as DEMO_ROOT
from training.demo_data import build_demo_dataset, check_demo_root
from training.engine import RunPlan, Trainer, TrainParts
from training.step_stats import NonFiniteLossError
from training.io import atomic_write, check_output_dir

_logger = logging.getLogger("train")
HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(HERE, "configs", "demo.yaml")
CKPT_VERSION = 2
RUN_FILES = ("args.yaml", "summary.csv", "checkpoints.json", "last.pth.tar", "model_best.pth.tar")


# ----------------------------------------------------------------------------------------------------- arguments
def _data_options(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("data", nargs="?", default=None, metavar="DIR",
                   help="dataset root with train/<class>/*.jpeg and val/<class>/*.jpeg (or train.tar / val.tar); "
                        "omitted: the embedded demo")
    g.add_argument("--data-dir", dest="data_dir", default=None, help="same as the positional DIR")
    g.add_argument("--dataset", default="", help="'' (image folder or <split>.tar) or hfds/<name> (Hugging Face)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--bad-image", default="skip", choices=tdata.BAD_IMAGE_CHOICES,
                   help="unreadable image: warn naming the file and skip it, or stop with its path")
    g.add_argument("--demo-root", default=DEMO_ROOT,
                   help="where the demo dataset is built/cached (a new, empty or demo folder)")
    g.add_argument("--demo-train-per-class", type=int, default=None)
    g.add_argument("--demo-val-per-class", type=int, default=None)
    g.add_argument("--demo-img-size", type=int, default=None)
    g.add_argument("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loader worker processes per rank")
    g.add_argument("--pin-mem", action="store_true", default=False)
    g.add_argument("--no-prefetcher", action="store_true", default=False, help="accepted for compatibility; no effect")


def _model_options(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ddf_mul_resnet50", help="timm model name, e.g. ddf_mul_resnet50")
    g.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra create_model kwargs, e.g. se_ratio=0.3 filters=channel normalization=batch_norm")
    g.add_argument("--convert", action="store_true", default=False,
                   help="turn the model's eligible k x k convs into DDF layers (ddf.convert) right after it is built; "
                        "default policy auto: the DDF-ResNet layout on a timm ResNet, else every eligible conv")
    g.add_argument("--convert-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="ddf.convert options with --convert, e.g. include='layer[34].*' head=2 se_ratio=0.25 "
                        "min_channels=64 kernel_combine=add policy=all")
    g.add_argument("--pretrained", action="store_true", default=False)
    g.add_argument("--initial-checkpoint", default="", help="weights to start from (fine-tuning); not a resume")
    g.add_argument("--resume", default="", help="checkpoint to continue the same run from (last.pth.tar); a run that "
                                                "already finished --epochs is refused (exit 2) and left untouched")
    g.add_argument("--trust-checkpoint", action="store_true", default=False,
                   help="load --resume/--initial-checkpoint files with full unpickling, which can run code from the "
                        "file (default: weights-only loading, which refuses such files)")
    g.add_argument("--no-resume-opt", action="store_true", default=False,
                   help="on --resume restore only weights and epoch, not optimizer/scaler/EMA state")
    g.add_argument("--num-classes", type=int, default=None, help="default: number of classes in the data")
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="C 1 (grayscale: the model's in_chans=1, images decoded as 'L', default mean/std the "
                        "luma-weighted RGB ones) or 3 (RGB)")
    g.add_argument("--crop-pct", type=float, default=None)
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument("--interpolation", default="", help="eval resize interpolation (default: model's)")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="batch size per process")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("--drop", type=float, default=0.0, help="classifier dropout")
    g.add_argument("--drop-path", type=float, default=None)
    g.add_argument("--channels-last", action="store_true", default=False)
    g.add_argument("--torch-compile", "--torchcompile", dest="torch_compile", nargs="?", const="inductor", default=None,
                   metavar="BACKEND", help="compile the model with torch.compile (timm spells it --torchcompile)")


def _optim_options(p) -> None:
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", default="sgd")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--clip-grad", type=float, default=None, help="gradient clipping threshold")
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", action="store_true", default=False, help="step the schedule every update")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate, used as given (default: from --lr-base and the global batch, see there)")
    g.add_argument("--lr-base", type=float, default=0.1,
                   help="without --lr: lr = lr-base x (global batch / lr-base-size), the ratio under a square root "
                        "for --lr-base-scale sqrt (timm's rule)")
    g.add_argument("--lr-base-size", type=int, default=256, help="the global batch --lr-base is given for")
    g.add_argument("--lr-base-scale", default="", choices=("", "linear", "sqrt"),
                   help="how the lr follows the global batch; '': sqrt for the Ada*/LAMB optimizers, else linear "
                        "(as timm)")
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--epochs", type=int, default=120)
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--decay-epochs", type=float, default=90)
    g.add_argument("--decay-rate", type=float, default=0.1)


def _augment_options(p) -> None:
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
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing, in [0, 1)")


def _run_options(p) -> None:
    g = p.add_argument_group("batch norm, EMA, distributed, precision")
    g.add_argument("--sync-bn", action="store_true", default=False, help="SyncBatchNorm (CUDA only)")
    g.add_argument("--dist-bn", default="reduce", choices=("", "reduce", "broadcast"),
                   help="after each epoch, average (reduce) or copy from rank 0 (broadcast) the BN statistics")
    g.add_argument("--model-ema", action="store_true", default=False)
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False)
    g.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--amp", action="store_true", default=False,
                   help="native torch.amp mixed precision (float16 + grad scaler on CUDA, bfloat16 on CPU)")
    g.add_argument("--native-amp", dest="amp", action="store_true", help="alias of --amp")
    g.add_argument("--apex-amp", action="store_true", default=False, help="not supported (apex); use --amp")
    g.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument("--ddf-backend", default=None, choices=BACKENDS,
                   help="kernels of the DDF op (default: DDF_BACKEND, else auto; a run stops when auto would fall "
                        "back to the slow reference, unless this or DDF_BACKEND says reference)")
    g = p.add_argument_group("run, logging, checkpoints")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--deterministic", action="store_true", default=False,
                   help="deterministic algorithms and cudnn; with --seed a resumed run reproduces an uninterrupted one")
    g.add_argument("--output", default="output/train", help="parent folder of the run folder")
    g.add_argument("--experiment", default="",
                   help="run folder name (default: <date>-<model>); a name already used gets a -N suffix")
    g.add_argument("--log-interval", type=int, default=50,
                   help="progress line every N steps (0: none); the loss is read from the device, checked for "
                        "NaN/Inf and the stop request agreed across ranks only at these steps (every 50 with 0)")
    g.add_argument("--max-nonfinite-steps", type=int, default=100, metavar="N",
                   help="float16 AMP: stop (keeping the last checkpoint) after N consecutive steps that the GradScaler "
                        "skipped for a non-finite loss or gradients (0: never). Without a GradScaler (float32, "
                        "bfloat16) a non-finite loss stops the run at the next log-interval step")
    g.add_argument("--checkpoint-hist", type=int, default=3, help="keep the top-k epoch checkpoints")
    g.add_argument("--checkpoint-interval", type=int, default=0,
                   help="also write last.pth.tar every N steps inside an epoch (mid-epoch resume)")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="save last.pth.tar and stop after N optimizer steps in total (simulated interruption)")
    g.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"))
    g.add_argument("--no-tensorboard", action="store_true", default=False)


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description="DDF-ResNet training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default="", metavar="FILE",
                   help="YAML file of defaults (keys = option names); command-line options override it")
    for add in (_data_options, _model_options, _optim_options, _augment_options, _run_options):
        add(p)
    return p


MAX_LR = 100.0  # far above any real learning rate (SGD on ImageNet: ~0.1-1); 1e30 diverges at step 1
RANGES = [  # (option, lo, hi, lo_open, hi_open); nan/inf floats are refused for every option listed
    ("epochs", 1, None, False, False), ("batch_size", 1, None, False, False),
    ("validation_batch_size", 1, None, False, False), ("workers", 0, None, False, False),
    ("smoothing", 0.0, 1.0, False, True), ("lr", 0.0, MAX_LR, True, False), ("lr_base", 0.0, MAX_LR, True, False),
    ("lr_base_size", 1, None, False, False), ("warmup_lr", 0.0, MAX_LR, False, False),
    ("min_lr", 0.0, MAX_LR, False, False), ("mean", None, None, False, False), ("opt_eps", 0.0, None, True, False),
    ("warmup_epochs", 0, None, False, False), ("cooldown_epochs", 0, None, False, False),
    ("decay_epochs", 0.0, None, True, False), ("decay_rate", 0.0, None, True, False),
    ("momentum", 0.0, 1.0, False, True), ("weight_decay", 0.0, None, False, False), ("clip_grad", 0.0, None, True, False),
    ("drop", 0.0, 1.0, False, True), ("drop_path", 0.0, 1.0, False, True), ("mixup", 0.0, None, False, False),
    ("cutmix", 0.0, None, False, False), ("mixup_prob", 0.0, 1.0, False, False),
    ("mixup_switch_prob", 0.0, 1.0, False, False), ("reprob", 0.0, 1.0, False, False), ("hflip", 0.0, 1.0, False, False),
    ("vflip", 0.0, 1.0, False, False), ("color_jitter", 0.0, None, False, False), ("scale", 0.0, 1.0, True, False),
    ("ratio", 0.0, None, True, False), ("crop_pct", 0.0, 1.0, True, False), ("img_size", 1, None, False, False),
    ("input_size", 1, None, False, False), ("std", 0.0, None, True, False), ("num_classes", 1, None, False, False),
    ("model_ema_decay", 0.0, 1.0, True, True), ("log_interval", 0, None, False, False),
    ("max_nonfinite_steps", 0, None, False, False), ("checkpoint_hist", 0, None, False, False),
    ("checkpoint_interval", 0, None, False, False),
    ("stop_after_steps", 0, None, False, False), ("seed", 0, None, False, False),
    ("demo_train_per_class", 1, None, False, False), ("demo_val_per_class", 1, None, False, False),
    ("demo_img_size", 8, None, False, False),
]


KWARGS_KEYS = ("model_kwargs", "convert_kwargs")  # YAML keys read as a mapping or a list of key=value strings


def _config_kwargs(raw, path: str, key: str = "model_kwargs") -> Dict:
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return {str(k): v for k, v in raw.items()}
    if isinstance(raw, (list, str)):
        return cli.parse_kv(raw, f"--config {path}: {key}")
    raise cli.UsageError(f"--config {path}: {key} must be a mapping (key: value) or a list of key=value "
                         f"strings, got {raw!r}")


def check_args(args) -> None:
    for name, lo, hi, lo_open, hi_open in RANGES:
        cli.check_range(args, name, lo, hi, lo_open, hi_open)
    model_options.check_norm_lengths(args.mean, args.std, model_options.input_channels(args.input_size))
    if args.scale[0] > args.scale[1] or args.ratio[0] > args.ratio[1]:
        raise cli.UsageError(f"--scale and --ratio need MIN <= MAX, got {list(args.scale)} and {list(args.ratio)}")
    if args.apex_amp:
        raise cli.UsageError("--apex-amp: NVIDIA apex is not supported (obsolete); use --amp (native torch.amp, "
                             "float16 + GradScaler on CUDA) or --amp --amp-dtype bfloat16")


def model_sources(args, from_config: Iterable[str] = (), config_path: str = "") -> Dict[str, str]:
    """create_model kwarg -> the option that set it, for one-line errors (training.model_options); ``from_config``:
    the model_kwargs keys that came from the YAML file (not overridden on the command line)."""
    src = {k: (f"--config {config_path}: model_kwargs {k}={v!r}" if k in from_config else f"--model-kwargs {k}={v!r}")
           for k, v in args.model_kwargs.items()}
    src.update(drop_rate=f"--drop {args.drop}", drop_path_rate=f"--drop-path {args.drop_path}",
               num_classes=f"--num-classes {args.num_classes}")
    if args.input_size is not None:
        src["in_chans"] = "--input-size " + " ".join(str(v) for v in args.input_size)
    return src


def convert_sources(args, from_config: Iterable[str] = (), config_path: str = "") -> Dict[str, str]:
    """ddf.convert option -> the option that set it (``--convert-kwargs k=v`` or the YAML file's convert_kwargs)."""
    return {k: (f"--config {config_path}: convert_kwargs {k}={v!r}" if k in from_config else
                f"--convert-kwargs {k}={v!r}") for k, v in args.convert_kwargs.items()}


def create_kwargs(args, num_classes: Optional[int]) -> Dict:
    """What create_model gets besides the name: classes, dropout, input channels (--input-size C), --model-kwargs."""
    kw = {"drop_rate": args.drop, **({"num_classes": num_classes} if num_classes else {})}
    if args.drop_path is not None:
        kw["drop_path_rate"] = args.drop_path
    if args.input_size is not None:
        kw["in_chans"] = model_options.input_channels(args.input_size)
    return {**kw, **args.model_kwargs}


def check_timm_options(args, sources: Dict[str, str], conv_sources: Optional[Dict[str, str]] = None) -> None:
    """Every value passed on to timm (and --convert's to ddf.convert), checked now (before any run folder or data):
    one line naming the option. With --convert, ``args.convert_kwargs`` becomes the full settings of the run
    (:func:`training.model_options.convert_settings`: every option explicit, policy resolved)."""
    if args.convert_kwargs and not args.convert:
        first = next(iter((conv_sources or {}).values()), "--convert-kwargs")
        raise cli.UsageError(f"{first}: convert options without --convert (or convert: true in the YAML file)")
    if "in_chans" in args.model_kwargs:  # the data must be decoded with the same channels as the model takes
        raise cli.UsageError(f"--model-kwargs in_chans={args.model_kwargs['in_chans']!r}: give the input channels as --input-size C H W (it sets both the "
                             f"model's in_chans and how the images are decoded)")
    model_options.check_mixup_batch(args.batch_size, args.mixup, args.cutmix)
    model_options.check_interpolation(args.interpolation, "--interpolation")
    model_options.check_interpolation(args.train_interpolation, "--train-interpolation", allow_random=True)
    model_options.check_auto_augment(args.aa)
    settings = model_options.check_model(args.model, create_kwargs(args, args.num_classes), sources,
                                         model_options.input_channels(args.input_size),
                                         convert=args.convert_kwargs if args.convert else None,
                                         convert_sources=conv_sources)
    args.convert_kwargs = settings or {}


def parse_args(argv: Optional[List[str]] = None):
    parser = build_parser()
    known, _ = build_parser().parse_known_args(argv)
    config_path = known.config
    if not config_path and known.data is None and known.data_dir is None and os.path.isfile(DEMO_CONFIG):
        config_path = DEMO_CONFIG  # `python train.py` with no data: the demo config
    cfg = {key: {} for key in KWARGS_KEYS}
    if config_path:
        defaults, raw = cli.load_config(config_path, parser, special=KWARGS_KEYS)
        parser.set_defaults(**defaults)
        cfg = {key: _config_kwargs(raw.get(key), config_path, key) for key in KWARGS_KEYS}
    args = parser.parse_args(argv)
    args.config = config_path
    cli_model_kwargs = cli.parse_kv(args.model_kwargs)
    args.model_kwargs = {**cfg["model_kwargs"], **cli_model_kwargs}
    cli_convert_kwargs = cli.parse_kv(args.convert_kwargs, "--convert-kwargs")
    args.convert_kwargs = {**cfg["convert_kwargs"], **cli_convert_kwargs}
    if args.data_dir and args.data and args.data_dir != args.data:
        raise cli.UsageError(f"data given twice: {args.data!r} and --data-dir {args.data_dir!r}")
    args.data = args.data_dir = args.data or args.data_dir
    args.scale, args.ratio = tuple(args.scale), tuple(args.ratio)
    check_args(args)
    check_timm_options(args, model_sources(args, set(cfg["model_kwargs"]) - set(cli_model_kwargs), config_path),
                       convert_sources(args, set(cfg["convert_kwargs"]) - set(cli_convert_kwargs), config_path))
    return args


# ------------------------------------------------------------------------------------------------------- output
def _holds_run(folder: str) -> bool:
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, f)) for f in RUN_FILES)


def planned_epochs(args) -> int:
    """The epochs the schedule runs (``--epochs``, plus ``--cooldown-epochs`` for the cycle schedules), as
    build_optimisation will get them from timm, computed on a one-parameter optimizer."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    return create_scheduler_v2(opt, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
                               cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
                               warmup_lr=args.warmup_lr, warmup_epochs=min(args.warmup_epochs, args.epochs - 1),
                               updates_per_epoch=1)[1]


def check_not_finished(args, ckpt: Dict) -> None:
    """A --resume with nothing left to train is refused before anything is written (exit 2): the run folder, its
    args.yaml, summary.csv and checkpoints stay byte for byte as they are."""
    step = int(ckpt.get("step", 0) or 0)
    done = int(ckpt.get("epoch", -1)) + (0 if step else 1)  # the epoch to start at = epochs completed
    total = planned_epochs(args)
    if done >= total:
        cool = f" + {args.cooldown_epochs} cooldown" if total > args.epochs else ""
        raise cli.UsageError(f"--resume {args.resume}: the run already finished {done} epoch(s) (--epochs "
                             f"{args.epochs}{cool}); nothing to do, nothing written (raise --epochs to train more: "
                             f"that starts a new run folder and leaves this one as it is)")


def check_same_conversion(args, ckpt: Dict) -> None:
    """A --resume rebuilds the model from the options given now: its conversion must be the checkpoint's own
    (refused before anything is written; a checkpoint of before --convert records none)."""
    old = ckpt.get("convert")
    now = dict(args.convert_kwargs) if args.convert else None
    if old != now:
        said = (lambda c: "no --convert" if c is None else f"--convert with {c}")
        raise cli.UsageError(f"--resume {args.resume}: the run was trained with {said(old)} but this command asks "
                             f"for {said(now)}; resume with the run's own --convert / --convert-kwargs")


def choose_run_folder(args, ckpt: Optional[Dict] = None, held: Optional[run_folder.RunLock] = None
                      ) -> run_folder.RunLock:
    """Claim the run folder (its ``run.lock``, see :mod:`training.run_folder`) before any set-up. ``--resume
    <run>/last.pth.tar`` of an unfinished run continues in ``<run>`` (:func:`training.checkpoint.continues_in_place`);
    anything else gets ``--output/--experiment`` (default ``<date>-<model>``), and a folder that holds another run
    or is claimed by a live one is never reused: a ``-1``, ``-2``... suffix is added."""
    if args.resume:
        if ckpt is None:
            ckpt = checkpoint_dict(load_checkpoint(args.resume, trust=args.trust_checkpoint), args.resume, "--resume")
        lock = _resume_in_place(args, ckpt, held)
        if lock is not None:
            return lock
    if args.experiment:
        out = os.path.join(args.output, args.experiment)
    else:
        out = os.path.join(args.output, datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + args.model)
    out = os.path.abspath(out)
    # a file in the way, an unwritable parent: one clear error; the run folder itself is made by the claim, which
    # records that this run created it (a failed set-up then removes it again: set_up_or_discard)
    check_output_dir(out if os.path.isdir(out) else os.path.dirname(out), "--output/--experiment")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output/--experiment: {out} is not a folder (a file is in the way)")
    return run_folder.claim_new(out, _holds_run)


def _recover_resumed_folder(path: str) -> Optional[run_folder.RunLock]:
    """When ``path`` is ``<run>/last.pth.tar`` and ``<run>`` was killed during a save, lock ``<run>`` and bring it to
    its last committed epoch-end save (:func:`training.checkpoint.recover_run_folder`) before the file is read;
    returns that lock, or None (nothing to recover, or a live run holds the folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) != LAST_NAME or not is_run_folder(folder):
        return None
    if not recover_run_folder(folder, dry_run=True):
        return None
    lock = run_folder.try_lock(folder)
    if lock is not None:
        try:
            recover_run_folder(folder)
        except BaseException:
            lock.release()
            raise
    return lock


def _resume_in_place(args, ckpt: Dict, held: Optional[run_folder.RunLock]) -> Optional[run_folder.RunLock]:
    """The lock of the run folder ``--resume`` continues in (``held``: taken while recovering it), or None when this
    run starts a new run folder (then ``args.resumed_from`` records the file and ``held`` is released)."""
    folder = continues_in_place(args.resume, ckpt)
    if folder is not None and (not args.experiment or os.path.abspath(os.path.join(args.output, args.experiment))
                               == folder):
        if held is not None:
            return held
        try:
            return run_folder.claim_existing(folder)
        except run_folder.RunFolderBusy as e:
            raise cli.UsageError(f"--resume: {e}") from None
    if held is not None:
        held.release()
    _logger.info("--resume %s: not the last.pth.tar of an unfinished run folder; this run starts a new run "
                 "folder and leaves %s as it is", args.resume, os.path.dirname(os.path.abspath(args.resume)))
    args.resumed_from = os.path.abspath(args.resume)  # recorded in args.yaml and the checkpoints
    return None


def _read_resume(args, rt: runtime.Runtime) -> Tuple[Optional[Dict], Optional[run_folder.RunLock]]:
    """The --resume checkpoint (None without --resume) and, on rank 0, the lock of its run folder when it was
    killed during a save and has just been brought to its last committed epoch; every rank reads the file after
    that recovery, and a finished run stops every rank here, before anything is written."""
    if not args.resume:
        return None, None
    held = _recover_resumed_folder(args.resume) if rt.primary else None
    try:
        if rt.distributed:
            rt.barrier()  # the other ranks read the file once rank 0 has completed an interrupted save
        if not os.path.isfile(args.resume):
            raise cli.UsageError(f"--resume: checkpoint not found: {os.path.abspath(args.resume)}")
        ckpt = checkpoint_dict(load_checkpoint(args.resume, trust=args.trust_checkpoint), args.resume, "--resume")
        check_not_finished(args, ckpt)
        check_same_conversion(args, ckpt)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return ckpt, held


def prepare_output(args, rt: runtime.Runtime) -> Tuple[str, Optional[run_folder.RunLock]]:
    """Check every output path before the work starts (run folder, demo folder); rank 0 claims the run folder and
    holds its lock (returned; None on the other ranks), the others are told the folder."""
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        raise cli.UsageError(f"--initial-checkpoint: file not found: {os.path.abspath(args.initial_checkpoint)}")
    ckpt, held = _read_resume(args, rt)
    try:
        if args.data is None:
            check_demo_root(args.demo_root)
        lock = choose_run_folder(args, ckpt, held) if rt.primary else None
    except BaseException:
        if held is not None:
            held.release()
        raise
    ckpt = None
    out = [lock.folder if lock else None]
    try:
        if rt.distributed:
            dist.broadcast_object_list(out, src=0)
        if rt.primary:
            check_output_dir(out[0], "--output/--experiment")
    except BaseException:
        if lock is not None:
            lock.discard()
        raise
    return out[0], lock


# --------------------------------------------------------------------------------------------------------- data
def build_data(args, rt: runtime.Runtime) -> SimpleNamespace:
    """Train and val datasets (demo built first when no data is given), class checks, samplers and loaders."""
    if args.data is None:
        if rt.primary:
            build_demo_dataset(args.demo_root, train_per_class=args.demo_train_per_class,
                               val_per_class=args.demo_val_per_class, img_size=args.demo_img_size)
        rt.barrier()
        args.data = args.data_dir = os.path.abspath(args.demo_root)
        args.demo = True
    train_ds = tdata.create_dataset(args.data, args.train_split, args.dataset, args.bad_image, seed=args.seed)
    val_ds = tdata.create_dataset(args.data, args.val_split, args.dataset, args.bad_image, substitute=False)
    if train_ds.classes != val_ds.classes:
        diff = sorted(set(train_ds.classes) ^ set(val_ds.classes))
        raise tdata.DatasetError(f"classes differ between {train_ds.source} and {val_ds.source}: {diff[:10]}")
    num_classes = args.num_classes or len(train_ds.classes)
    if num_classes < len(train_ds.classes):
        raise cli.UsageError(f"--num-classes {num_classes} is smaller than the {len(train_ds.classes)} classes in "
                             f"{train_ds.source}")
    per_rank = len(train_ds) // rt.world_size
    if args.batch_size > per_rank:
        raise cli.UsageError(f"--batch-size {args.batch_size} is larger than the {per_rank} training images per "
                             f"process in {train_ds.source}")
    args.num_classes = num_classes
    train_sampler = tdata.ResumableSampler(len(train_ds), shuffle=True, seed=args.seed, num_replicas=rt.world_size,
                                           rank=rt.rank)
    val_sampler = tdata.ResumableSampler(len(val_ds), shuffle=False, num_replicas=rt.world_size, rank=rt.rank,
                                         pad=False)
    # own generators: creating a loader iterator then draws no number from the global torch RNG, so a run resumed
    # mid-epoch sees the same RNG stream (drop-path, mixup) as an uninterrupted one; workers ignore stop signals
    kw = dict(num_workers=args.workers, pin_memory=args.pin_mem and rt.device.type == "cuda",
              worker_init_fn=runtime.ignore_stop_signals, generator=torch.Generator().manual_seed(args.seed))
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, sampler=train_sampler,
                                               drop_last=True, **kw)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=args.validation_batch_size or args.batch_size,
                                             sampler=val_sampler, collate_fn=tdata.collate_skip, **kw)
    steps = int(math.ceil(len(train_ds) / rt.world_size)) // args.batch_size
    return SimpleNamespace(train=train_ds, val=val_ds, train_loader=train_loader, val_loader=val_loader,
                           num_classes=num_classes, steps_per_epoch=steps, fingerprint=tdata.fingerprint(train_ds))


def set_transforms(args, data: SimpleNamespace, data_config: Dict) -> None:
    data.train.channels = data.val.channels = int(data_config["input_size"][0])  # 1: images decoded as 'L'
    data.train.transform = create_transform(
        data_config["input_size"], is_training=True, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=args.train_interpolation,
        mean=data_config["mean"], std=data_config["std"], re_prob=args.reprob)
    data.val.transform = eval_transform(data_config)


def eval_transform(data_config: Dict):
    """timm's eval transform (resize by crop_pct, center crop, normalize) from a resolved data config."""
    return create_transform(data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
                            mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"])


# -------------------------------------------------------------------------------------------------------- model
def build_model(args, num_classes: int, rt: runtime.Runtime):
    model = model_options.create_model(args.model, create_kwargs(args, num_classes), model_sources(args),
                                       pretrained=args.pretrained)
    data_config = model_options.fit_channels(resolve_data_config(vars(args), model=model, verbose=False))
    if args.convert:  # before the weights of --initial-checkpoint (a converted run's fit), EMA, DDP, compile
        model, conv_report = model_options.convert_model(model, args.model, args.convert_kwargs,
                                                         convert_sources(args), data_config["input_size"])
        _logger.info("--convert %s: %s", args.convert_kwargs, model_options.convert_summary(conv_report))
    if args.initial_checkpoint:
        load_initial_weights(model, args.initial_checkpoint, args.trust_checkpoint)
    _logger.info("model %s: %.2fM params, kwargs %s, data config %s", args.model,
                 sum(p.numel() for p in model.parameters()) / 1e6, args.model_kwargs, data_config)
    model.to(rt.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if rt.distributed and args.sync_bn:
        if rt.device.type != "cuda":
            raise cli.UsageError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); on CPU use --dist-bn reduce")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = None
    if args.model_ema:
        ema = ModelEmaV3(model, decay=args.model_ema_decay,
                         device=torch.device("cpu") if args.model_ema_force_cpu else None)
    return model, ema, data_config


def load_initial_weights(model: nn.Module, path: str, trust: bool = False) -> None:
    """Fine-tuning start: weights only; tensors whose shape differs (e.g. another classifier size) stay initialised."""
    sd = unwrap_state_dict(checkpoint_dict(load_checkpoint(path, trust=trust), path, "--initial-checkpoint"))
    own = model.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    for k in mismatched:
        del sd[k]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    loaded = sum(1 for k in sd if k in own)  # unexpected keys are not loaded
    _logger.info("initial checkpoint %s: %d of %d tensors loaded; reinitialised %s; missing %s; unexpected %s", path,
                 loaded, len(own), mismatched or "none", list(missing) or "none", list(unexpected) or "none")


# ------------------------------------------------------------------------------------------ optimiser, schedule
def effective_lr(args, world_size: int) -> Tuple[float, str]:
    """(lr, how it was found) for ``world_size`` processes x ``--batch-size``: ``--lr`` when given, else timm's rule
    ``lr-base x (global batch / lr-base-size)``, the ratio under a square root for ``--lr-base-scale sqrt`` (by
    default for the Ada*/LAMB optimizers). The configs give ``lr_base``/``lr_base_size``, so a run on fewer GPUs
    scales down: 0.1 per 256 gives 0.4 on 8 x 128 and 0.2 on 4 x 128."""
    global_batch = args.batch_size * world_size
    if args.lr is not None:
        return args.lr, "given"
    scale = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear")
    ratio = global_batch / args.lr_base_size
    lr = args.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)
    root = "sqrt" if scale == "sqrt" else ""
    return lr, f"lr-base {args.lr_base:g} x {root}({global_batch} / {args.lr_base_size})"


def build_optimisation(args, model: nn.Module, ema, data: SimpleNamespace, rt: runtime.Runtime):
    lr, _ = effective_lr(args, rt.world_size)
    args.lr_effective = lr
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                                    **({"eps": args.opt_eps} if args.opt_eps is not None else {}))
    amp_dtype, args.precision = runtime.resolve_amp(rt.device, args.amp, args.amp_dtype)
    if args.warmup_epochs and args.warmup_epochs >= args.epochs:
        _logger.warning("--warmup-epochs %d >= --epochs %d: warming up for %d epoch(s) instead", args.warmup_epochs,
                        args.epochs, args.epochs - 1)
        args.warmup_epochs = args.epochs - 1
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=data.steps_per_epoch)
    mixup, loss_fn = None, nn.CrossEntropyLoss()
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                      num_classes=data.num_classes)
        loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    parts = TrainParts(model=model, optimizer=optimizer, loss_fn=loss_fn, scheduler=scheduler,
                       autocast=runtime.autocast_ctx(rt.device, amp_dtype),
                       scaler=runtime.make_grad_scaler(rt.device, amp_dtype), mixup=mixup, ema=ema,
                       clip_grad=args.clip_grad, clip_mode=args.clip_mode, channels_last=args.channels_last,
                       sched_on_updates=args.sched_on_updates)
    plan = RunPlan(epochs=num_epochs, steps_per_epoch=data.steps_per_epoch, eval_metric=args.eval_metric,
                   log_interval=args.log_interval, checkpoint_interval=args.checkpoint_interval,
                   stop_after_steps=args.stop_after_steps, dist_bn=dist_bn_mode(args, rt.distributed),
                   max_nonfinite_steps=args.max_nonfinite_steps)
    return parts, plan


def dist_bn_mode(args, distributed: bool) -> str:
    """BN-statistics sync after each epoch: off when not distributed, and off under --sync-bn (as timm does:
    SyncBatchNorm already keeps the ranks' running statistics equal)."""
    return args.dist_bn if distributed and not args.sync_bn else ""


def wrap_model(args, parts: TrainParts, rt: runtime.Runtime) -> None:
    """DDP, then torch.compile of the DDP module (timm's order; dynamo then splits the graph at DDP's gradient
    buckets, so communication overlaps the backward), after the weights are final (resume loads into the bare
    model)."""
    if rt.distributed:
        parts.model = nn.parallel.DistributedDataParallel(
            parts.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if args.torch_compile:
        parts.model = torch.compile(parts.model, backend=args.torch_compile)


# ------------------------------------------------------------------------------------------------------- resume
def run_signature(args, data: SimpleNamespace, rt: runtime.Runtime) -> Dict:
    """The settings that define which sample is seen at which step; --resume checks them."""
    return {"batch_size": args.batch_size, "world_size": rt.world_size, "seed": args.seed,
            "steps_per_epoch": data.steps_per_epoch, "data": data.fingerprint}


def check_resume(path: str, ckpt: Dict, sig: Dict, mid_epoch: bool, class_names: List[str]) -> None:
    """Refuse a resume that would skip or repeat samples, or continue on other data. Between epochs a different
    batch size / process count loses no sample, so it is allowed (with a warning); inside an epoch it is not."""
    old = ckpt.get("run")
    if old is None:  # checkpoint written before run signatures: check what it records
        old_args = ckpt.get("args") or {}
        old = {"batch_size": old_args.get("batch_size"), "seed": old_args.get("seed")}
        if ckpt.get("class_names") and list(ckpt["class_names"]) != list(class_names):
            raise cli.UsageError(f"--resume {path}: the checkpoint was trained on other classes than the data given "
                                 f"now; resume with the same data, or use --initial-checkpoint to fine-tune")
        _logger.warning("--resume %s: older checkpoint without a run signature; process count and data not checked",
                        path)
    elif old["data"] != sig["data"]:
        raise cli.UsageError(f"--resume {path}: the training data differ from the checkpoint's ({old['data']} vs now "
                             f"{sig['data']}); resume with the same data, or use --initial-checkpoint to fine-tune")
    changed = {k: (old.get(k), sig[k]) for k in ("batch_size", "world_size", "seed")
               if old.get(k) is not None and old.get(k) != sig[k]}
    if not changed:
        return
    text = ", ".join(f"{'--' + k.replace('_', '-') if k != 'world_size' else 'processes'} {a} -> {b}"
                     for k, (a, b) in changed.items())
    if mid_epoch:
        raise cli.UsageError(f"--resume {path}: saved inside an epoch with other settings ({text}); continuing would "
                             f"skip or repeat samples. Use the checkpoint's settings, or resume from an epoch-end "
                             f"checkpoint")
    _logger.warning("--resume %s: %s; resuming at an epoch boundary, so no sample is skipped or repeated", path, text)


def resume(args, parts: TrainParts, sig: Dict, class_names: List[str]):
    """Load --resume into the bare model / EMA / optimizer / scaler / scheduler; return (epoch, step, ckpt)."""
    ckpt = checkpoint_dict(load_checkpoint(args.resume, trust=args.trust_checkpoint), args.resume, "--resume")
    if ckpt.get("arch") and ckpt["arch"] != args.model:
        raise cli.UsageError(f"--resume {args.resume} was trained as {ckpt['arch']!r} but --model is {args.model!r}")
    step = int(ckpt.get("step", 0))
    epoch = int(ckpt.get("epoch", -1)) + (0 if step else 1)  # mid-epoch: 'epoch' is the epoch in progress
    check_resume(args.resume, ckpt, sig, step > 0, class_names)
    sd = unwrap_state_dict(ckpt, use_ema=False)
    bad = model_options.state_dict_mismatch(unwrap_model(parts.model), sd)
    if bad:  # e.g. another --input-size or --model-kwargs than the run was started with
        raise cli.UsageError(f"--resume {args.resume}: its weights do not fit --model {args.model} as built now "
                             f"({bad}); resume with the run's own --input-size / --model-kwargs / --convert")
    unwrap_model(parts.model).load_state_dict(sd)
    if not args.no_resume_opt:
        if "optimizer" in ckpt:
            parts.optimizer.load_state_dict(ckpt["optimizer"])
        if parts.scaler is not None and ckpt.get("scaler"):
            parts.scaler.load_state_dict(ckpt["scaler"])
        if parts.ema is not None and ckpt.get("state_dict_ema"):
            parts.ema.module.load_state_dict(unwrap_state_dict(ckpt, use_ema=True))
        if ckpt.get("scheduler"):
            parts.scheduler.load_state_dict(ckpt["scheduler"])
    _logger.info("resumed from %s: epoch %d, step %d", args.resume, epoch, step)
    return epoch, step, ckpt


# --------------------------------------------------------------------------------------------------------- main
def plain_args(args) -> Dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    rt = runtime.init_runtime(args.device)
    runtime.setup_logging(rt.rank)
    try:
        with runtime.determinism(args.deterministic, rt.device), runtime.GracefulStop(rt) as stop, \
                (use_backend(args.ddf_backend) if args.ddf_backend else contextlib.nullcontext()):
            return run(args, rt, stop)
    finally:
        runtime.shutdown(rt)


def run(args, rt: runtime.Runtime, stop: runtime.GracefulStop) -> Dict:
    runtime.seed_everything(args.seed)
    try:  # before any output: a failed kernel build never silently becomes a slow run
        op = require_compiled(rt.device)
    except RuntimeError as exc:
        raise cli.UsageError(str(exc)) from None
    out_dir, lock = prepare_output(args, rt)
    try:  # rank 0 holds the run folder's lock for the run's whole life
        return train_in(args, rt, stop, out_dir, op, set_up_or_discard(args, rt, lock))
    finally:
        if lock is not None:
            lock.release()


def set_up_or_discard(args, rt: runtime.Runtime, lock: Optional[run_folder.RunLock]) -> SimpleNamespace:
    """:func:`set_up`; when it fails (bad data, bad model), rank 0 removes the run folder it claimed if this run
    created it and it holds nothing but the lock (:meth:`training.run_folder.RunLock.discard`), so a failed start
    leaves no empty run folder; a folder that existed before or holds anything else is kept."""
    try:
        return set_up(args, rt)
    except BaseException:
        if lock is not None:
            lock.discard()
        raise


def set_up(args, rt: runtime.Runtime) -> SimpleNamespace:
    """Data, model, optimiser and schedule, resume, compile/DDP: everything that can fail on a bad option or input
    before the run writes anything into its (already claimed) folder."""
    args.demo = False
    data = build_data(args, rt)
    model, ema, data_config = build_model(args, data.num_classes, rt)
    set_transforms(args, data, data_config)
    parts, plan = build_optimisation(args, model, ema, data, rt)
    sig = run_signature(args, data, rt)
    start_epoch, start_step, ckpt = 0, 0, None
    if args.resume:
        start_epoch, start_step, ckpt = resume(args, parts, sig, data.train.classes)
    if args.sched_on_updates:
        parts.scheduler.step_update(start_epoch * plan.steps_per_epoch + start_step)
    else:
        parts.scheduler.step(start_epoch)
    wrap_model(args, parts, rt)
    return SimpleNamespace(data=data, data_config=data_config, parts=parts, plan=plan, sig=sig, ckpt=ckpt,
                           start_epoch=start_epoch, start_step=start_step)


def train_in(args, rt: runtime.Runtime, stop: runtime.GracefulStop, out_dir: str, op: str,
             setup: SimpleNamespace) -> Dict:
    data, data_config, parts, plan, sig = setup.data, setup.data_config, setup.parts, setup.plan, setup.sig
    start_epoch, start_step, ckpt = setup.start_epoch, setup.start_step, setup.ckpt
    setup.ckpt = None
    saver = runlog = None
    if rt.primary:
        atomic_write(os.path.join(out_dir, "args.yaml"), yaml.safe_dump(plain_args(args), sort_keys=True))
        saver = CheckpointSaver(out_dir, top_k=args.checkpoint_hist, decreasing=args.eval_metric == "loss")
        runlog = runtime.RunLog(out_dir, tensorboard=not args.no_tensorboard)
    _logger.info("output: %s | %d process(es) on %s | precision: %s | global batch %d (%d x %d), lr %.4g (%s) | "
                 "%d epochs x %d steps | op: %s | %s", out_dir, rt.world_size, rt.device, args.precision,
                 args.batch_size * rt.world_size, rt.world_size, args.batch_size, args.lr_effective,
                 effective_lr(args, rt.world_size)[1],
                 plan.epochs, plan.steps_per_epoch, op, "demo dataset" if args.demo else data.train.source)
    meta = {"version": CKPT_VERSION, "arch": args.model, "args": plain_args(args), "num_classes": data.num_classes,
            "class_names": data.train.classes, "model_kwargs": dict(args.model_kwargs),
            "convert": dict(args.convert_kwargs) if args.convert else None,
            "data_config": dict(data_config), "run": sig}
    trainer = Trainer(parts, plan, rt, data.train_loader, data.val_loader, meta, saver, runlog, stop)
    if ckpt is not None:
        runtime.restore_rng(ckpt.get("rng_state"), rt.rank)
    result = trainer.fit(start_epoch, start_step, ckpt.get("train_state") if ckpt else None)
    ckpt = None
    result["output"] = out_dir
    if rt.primary:
        runlog.close()
        report(args, result, saver)
    rt.barrier()
    return result


def report(args, result: Dict, saver: CheckpointSaver) -> None:
    """The final result line (format kept stable: scripts parse it)."""
    if result["interrupted"]:
        _logger.info("stopped at step %d; resume with --resume %s", result["global_step"], saver.last_path)
    if saver.best is not None:
        result.update(best_metric=saver.best[0], best_epoch=saver.best[1], best_checkpoint=saver.best_path)
        name = "top-1" if args.eval_metric == "top1" else args.eval_metric
        print(f"best {name}: {saver.best[0]:.3f} (epoch {saver.best[1]}) checkpoint: {saver.best_path}", flush=True)
    elif result["interrupted"]:
        print(f"stopped at step {result['global_step']} before the first epoch ended; resume with --resume "
              f"{saver.last_path}", flush=True)


if __name__ == "__main__":
    cli.run_cli(main, errors=(NonFiniteLossError,))
