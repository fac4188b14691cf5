"""Phase ``training``: the demo on the GPU through the user's own commands.

1. ``distributed_train.sh 1`` (torchrun, NCCL) with ``--amp --amp-dtype float16`` (GradScaler), ``--channels-last``,
   ``--sync-bn``, stopped after 100 steps (``--stop-after-steps``: saves ``last.pth.tar``);
2. the same command with ``--resume <run>/last.pth.tar``: continues in place to the end of 4 epochs (188 steps);
3. ``train.py`` with ``--amp --amp-dtype bfloat16 --channels-last`` for 2 epochs;
4. ``validate.py --checkpoint <run>/model_best.pth.tar``: the same top-1 as the run's ``best top-1`` line.

``--dry-run``: a 10-class demo of 80 images on CPU through the same steps (gloo), float16 AMP and SyncBN left out
(CUDA only; CPU autocast is bfloat16), 2 epochs of 5 steps stopped after 7.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from .common import Context, result, table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BEST_RE = re.compile(r"^best top-1: (\d+\.\d+) \(epoch (\d+)\) checkpoint: (\S+)$", re.M)
TOP1_RE = re.compile(r"top-1: (\d+\.\d+) top-5")


def _sh(ctx: Context, name: str, cmd, budget: float):
    """Run one command, log to training/<name>.log; (rc, output, seconds)."""
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(min(budget, ctx.left() - 10), 5))
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = "timeout", (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else \
            (exc.stdout or "")
    with open(ctx.path("training", f"{name}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n\n" + out)
    return rc, out, time.time() - t0


def _common(ctx: Context):
    args = ["--demo-root", ctx.path("training", "demo", "x")[:-2], "--output", ctx.path("training", "runs", "x")[:-2],
            "--seed", "1", "--log-interval", "20"]
    if ctx.dry_run:
        return args + ["--demo-train-per-class", "8", "--demo-val-per-class", "4", "-b", "16", "--workers", "1",
                       "--warmup-epochs", "1", "--log-interval", "2"]
    return args + ["--workers", "4"]


def plan(ctx: Context):
    """(name, command, check) of each step; check(out) -> (ok, text)."""
    common, launch = _common(ctx), ["bash", os.path.join(ROOT, "distributed_train.sh"), "1"]
    gpu_only = [] if ctx.dry_run else ["--amp", "--amp-dtype", "float16", "--sync-bn"]
    epochs, stop = ("2", "7") if ctx.dry_run else ("4", "100")
    run16 = os.path.join(common[3], "fp16")
    first = launch + common + gpu_only + ["--channels-last", "--experiment", "fp16", "--epochs", epochs,
                                          "--stop-after-steps", stop]
    resume = launch + common + gpu_only + ["--channels-last", "--experiment", "fp16", "--epochs", epochs,
                                           "--resume", os.path.join(run16, "last.pth.tar")]
    bf16 = [sys.executable, os.path.join(ROOT, "train.py")] + common + [
        "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--experiment", "bf16", "--epochs", "2" if not
        ctx.dry_run else "1"]
    val = [sys.executable, os.path.join(ROOT, "validate.py"), "--checkpoint", os.path.join(run16, "model_best.pth.tar"),
           "--workers", "1"]
    return [("interrupted", first, lambda o, _: ("resume with --resume" in o, "stopped and saved last.pth.tar")),
            ("resumed", resume, best_check), ("bf16", bf16, best_check), ("validate", val, None)]


def best_check(out: str, floor: float = 20.0):
    """The run's 'best top-1' line, above ``floor`` (2x chance on the 10-class demo; 0 in the dry run, whose 10
    steps on 80 images learn little)."""
    m = BEST_RE.search(out)
    if not m:
        return False, "no 'best top-1' line"
    top1 = float(m.group(1))
    return top1 >= floor, f"best top-1 {top1:.3f} (epoch {m.group(2)}; chance 10, required >= {floor:g})"


def run(ctx: Context):
    rows, ok_all, best = [], True, None
    floor = 0.0 if ctx.dry_run else 20.0
    for name, cmd, check in plan(ctx):
        rc, out, secs = _sh(ctx, name, cmd, budget=ctx.left())
        if check is None:  # validate: the run's best top-1 again
            m = TOP1_RE.search(out)
            ok = rc == 0 and bool(m) and best is not None and abs(float(m.group(1)) - best) < 1e-3
            text = f"top-1 {m.group(1) if m else '?'} (run's best {best})"
        else:
            ok, text = check(out, floor)
            ok = ok and rc == 0
            if name == "resumed":
                m = BEST_RE.search(out)
                best = float(m.group(1)) if m else None
        if rc != 0:
            text += f"; exit {rc}: {out.strip().splitlines()[-1][:200] if out.strip() else ''}"
        ok_all &= ok
        rows.append([name, f"{rc}", f"{secs:.0f}", "pass" if ok else "FAIL", text])
        ctx.save_partial(result("fail", f"unfinished (last step: {name})", [_table(ctx, rows)]), "training")
    return result("pass" if ok_all else "fail", f"{sum(r[3] == 'pass' for r in rows)}/{len(rows)} steps passed",
                  [_table(ctx, rows)])


def _table(ctx: Context, rows):
    skipped = ("; left out in the dry run: --amp-dtype float16 with GradScaler and --sync-bn (CUDA only)"
               if ctx.dry_run else "")
    return table("Demo training through distributed_train.sh / train.py / validate.py" + skipped,
                 ["step", "exit", "seconds", "result", "detail"], rows,
                 note="logs: training/<step>.log under --out")
