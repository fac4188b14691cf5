#!/usr/bin/env python3
"""From a run to released weights: the model's weights alone, as ``<model>-<sha8>.safetensors`` (+ ``.pth``).

    python tools/release.py output/demo/demo_run1 --out release/              # the run's best (EMA when it has EMA)
    python tools/release.py output/train/run/checkpoint-7.pth.tar --out release/ --no-ema --pth
    python tools/release.py output/train/run --out release/ --average 3       # mean of the 3 best top-k checkpoints

The file loads with ``validate.py --checkpoint FILE.safetensors --model NAME`` (which gives the run's top-1 for
these weights: the metadata records the eval transform, classes and demo data) and with
``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=FILE))``. Metadata: model, top1, epoch,
args_sha256, weights (ema / plain / average of N), source. Checkpoints are loaded weights-only; an existing output
file is never replaced and nothing partial is left on an error. See training/release.py.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from training import cli  # noqa: E402


def build_parser():
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a train.py run folder (its model_best.pth.tar) or one checkpoint file")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the released file(s) (created if needed)")
    p.add_argument("--average", type=int, default=None, metavar="N",
                   help="average the N best checkpoints of the run folder's top-k index (checkpoints.json)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--use-ema", dest="use_ema", action="store_const", const=True, default=None,
                   help="release the EMA weights (an error when the checkpoint has none). Default: the EMA weights "
                        "whenever the checkpoint holds them, as validate.py and pretrained loading (ddf.state_dict)")
    g.add_argument("--no-ema", dest="use_ema", action="store_const", const=False,
                   help="release the plain weights even when the checkpoint has EMA weights")
    p.add_argument("--pth", action="store_true", default=False, help="also write <model>-<sha8>.pth")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from training.io import check_output_dir
    from training.release import ReleaseError, from_source, write_release

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ReleaseError(f"--out: {out} exists and is not a folder")
    rel = from_source(args.source, average=args.average, use_ema=args.use_ema)  # every input checked first
    check_output_dir(out, "--out")
    paths = write_release(rel, out, pth=args.pth)
    m = rel.metadata
    for path in paths:
        print(f"wrote {path} ({m['model']}, {m['weights']} weights, epoch {m['epoch']}, top-1 {m['top1']})",
              flush=True)
    return {"paths": paths, "metadata": m}


if __name__ == "__main__":
    cli.run_cli(main)
