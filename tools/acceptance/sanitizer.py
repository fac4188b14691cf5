"""Phase ``sanitizer``: ``compute-sanitizer --tool memcheck`` on forward + backward of every Triton kernel family,
and ``--tool racecheck`` on the backward (``tools/acceptance/sanitizer_target.py``), only our kernels instrumented
(``--kernel-name kns=ddf_``), PyTorch's caching allocator off so an out-of-bounds access cannot land in a pooled
block. ``--dry-run``: skipped (needs a GPU); the target program runs once in Triton's interpreter instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from .common import Context, result, table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = [sys.executable, "-m", "tools.acceptance.sanitizer_target"]


def _sanitizer() -> str:
    return shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), "")


def _run(ctx: Context, cmd, env, name, share: float = 0.5):
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(ctx.left() * share - 5, 10))
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, out = "timeout", ""
    with open(ctx.path("sanitizer", f"{name}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n\n" + out)
    return rc, out, time.time() - t0


def _verdict(rc, out: str):
    summary = next((line for line in out.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line), "")
    ok = rc == 0 and "ok:" in out and ("0 errors" in summary or "0 hazards" in summary or not summary)
    return ok, (summary.replace("=", "").strip() or f"exit {rc}") + ("" if ok else f"; last: {out.strip()[-200:]}")


def run(ctx: Context):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    if ctx.dry_run:
        env["TRITON_INTERPRET"] = "1"
        rc, out, secs = _run(ctx, TARGET, env, "target", share=1.0)
        if rc != 0:
            return result("fail", f"the sanitizer's target program failed on CPU (exit {rc} after {secs:.0f} s): "
                                  f"{out.strip()[-300:]}")
        return result("skipped", f"compute-sanitizer needs a GPU (dry run); its target program ran in Triton's "
                                 f"interpreter: {out.strip().splitlines()[-1]} ({secs:.0f} s)")
    tool = _sanitizer()
    if not tool:
        return result("fail", "compute-sanitizer is not on the PATH (nor /usr/local/cuda/bin)")
    rows, ok_all = [], True
    for name, extra, target in (("memcheck", ["--tool", "memcheck", "--leak-check", "no"], TARGET),
                                ("racecheck", ["--tool", "racecheck", "--racecheck-report", "all"],
                                 TARGET + ["--backward-only"])):
        cmd = [tool, *extra, "--kernel-name", "kns=ddf_", "--error-exitcode", "3", *target]
        rc, out, secs = _run(ctx, cmd, env, name)
        ok, text = _verdict(rc, out)
        ok_all &= ok
        rows.append([name, " ".join(extra), f"{secs:.0f}", "pass" if ok else "FAIL", text])
    t = table("compute-sanitizer on the Triton kernels", ["tool", "options", "seconds", "result", "summary"], rows)
    return result("pass" if ok_all else "fail", "; ".join(f"{r[0]} {r[3]}" for r in rows), [t])
