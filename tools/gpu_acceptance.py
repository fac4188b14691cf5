#!/usr/bin/env python
"""GPU acceptance: one command for a bare GPU machine that checks and times everything worth checking.

    PYTHONPATH=. python tools/gpu_acceptance.py --out gpu_acceptance        # on a GPU machine, < 8 min on one H100
    PYTHONPATH=. python tools/gpu_acceptance.py --dry-run --out /tmp/acc    # on a CPU machine (CI), < 10 min

Runs from the source tree (no install, no download). Phases, each in its own process with its own time box, so a
failure or hang in one leaves the others' results:

* ``env``: GPU, SMs, memory, driver, torch/triton/timm versions, TF32 settings, CUDA tools on the PATH;
* ``correctness``: the Triton kernels against the float64 reference (forward and every gradient, 4 dtypes, both
  layouts, mul/add, k 1/3/5/7, stride/dilation/head/FilterNorm), one input of more than 2**31 elements,
  DDFPack and ddf_mul_resnet50 CPU vs GPU, ``torch.compile`` of a DDF model;
* ``speed``: op GB/s against a copy of the same bytes, Table A and Table 2 (test_time.py), DDF-R50 vs ResNet-50
  training img/s (AMP bfloat16, channels_last), ratios measured in one process;
* ``training``: the demo through ``distributed_train.sh 1`` (NCCL) with AMP float16 + GradScaler, channels_last,
  SyncBN, an interruption, a resume and validate.py; a second run with AMP bfloat16;
* ``sanitizer``: compute-sanitizer memcheck (forward + backward) and racecheck (backward) on every kernel family.

It writes ``gpu_acceptance.md`` (tables to paste) and ``gpu_acceptance.json``
(``{"phases": [{"name", "status", "seconds", "reason"/"detail", "tables"}], ...}``) into ``--out``, and exits 1 when a
correctness, training or sanitizer phase failed. ``--dry-run`` runs every phase at tiny sizes on CPU (Triton
kernels in Triton's interpreter; CUDA-only steps skipped, each with its reason).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.acceptance import GATING, PHASES  # noqa: E402

#: seconds each phase may take (GPU run: < 8 min in all; dry run: < 10 min on a 2-core CPU machine)
BOXES = {"env": 40, "correctness": 150, "speed": 110, "training": 120, "sanitizer": 90}
DRY_BOXES = {"env": 40, "correctness": 240, "speed": 120, "training": 200, "sanitizer": 60}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_acceptance", help="folder for gpu_acceptance.md/.json and logs")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU; CUDA-only steps skipped with a reason")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--time-box", action="append", default=[], metavar="PHASE=SECONDS",
                   help="change one phase's time box (repeatable), e.g. --time-box correctness=300")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase in this process
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.phases.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in PHASES]
    if unknown or not chosen:
        p.error(f"--phases: unknown phase(s) {unknown or chosen}; expected a comma-separated subset of "
                f"{','.join(PHASES)}")
    args.chosen = chosen
    args.boxes = dict(DRY_BOXES if args.dry_run else BOXES)
    for item in args.time_box:
        name, _, secs = item.partition("=")
        try:
            value = float(secs)
        except ValueError:
            value = -1.0
        if name not in PHASES or not value > 0:
            p.error(f"--time-box: expected PHASE=SECONDS with PHASE in {','.join(PHASES)} and SECONDS > 0, "
                    f"got {item!r}")
        args.boxes[name] = value
    return args


def _phase_env(args, name: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRITON_CACHE_DIR", os.path.join(os.path.abspath(args.out), "triton-cache"))
    env.pop("TRITON_INTERPRET", None)
    if args.dry_run and name == "correctness":
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels on CPU tensors; set before `import ddf`
    return env


def run_phase(args, name: str) -> dict:
    """Run one phase in a child process within its time box; its result, or a failure saying what happened."""
    box = args.boxes[name]
    res_path = os.path.join(args.out, "phases", f"{name}.json")
    log_path = os.path.join(args.out, "logs", f"{name}.log")
    for p in (res_path, log_path):
        os.makedirs(os.path.dirname(p), exist_ok=True)
    if os.path.exists(res_path):
        os.remove(res_path)  # our own result file from an earlier invocation
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", name, "--out", args.out,
           "--deadline", str(time.time() + box - 5)] + (["--dry-run"] if args.dry_run else [])
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_phase_env(args, name),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=box)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    seconds = round(time.time() - t0, 1)
    res = _read_result(res_path)
    if rc is None:
        res = dict(res or {}, status="fail", detail=f"timed out after {box:g} s (time box); log: {log_path}")
    elif res is None:
        res = {"status": "fail", "detail": f"exited with status {rc} without a result; last lines: "
                                           f"{_tail(log_path)}"}
    res.update(name=name, seconds=seconds)
    res.setdefault("tables", [])
    return res


def _kill_group(proc) -> None:
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_result(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tail(path: str, n: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.rstrip() for line in f.readlines()[-n:])
    except OSError:
        return "(no log)"


MARKER = ".gpu_acceptance"


def claim_out(out: str) -> None:
    """--out must be new, empty, or a folder this command wrote before (its marker file): never a user's folder."""
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MARKER)):
        raise ValueError(f"--out {out} holds files this command did not write; give a new or empty folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; give a folder")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("written by tools/gpu_acceptance.py\n")


def child(args) -> int:
    """``--phase NAME``: run that phase here and write its result JSON."""
    import importlib

    from tools.acceptance.common import Context, write_json

    ctx = Context(out=args.out, dry_run=args.dry_run, deadline=args.deadline or time.time() + 600)
    mod = importlib.import_module(f"tools.acceptance.{args.phase}")
    if os.environ.get("DDF_ACCEPTANCE_TEST_HANG") == args.phase:  # tests: a phase that hangs past its time box
        time.sleep(3600)
    try:
        res = mod.run(ctx)
    except Exception as exc:  # the phase's own failure, reported as its result
        import traceback
        traceback.print_exc()
        res = {"status": "fail", "detail": f"{type(exc).__name__}: {exc}", "tables": []}
    write_json(os.path.join(args.out, "phases", f"{args.phase}.json"), res)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phase:
        return child(args)
    from tools.acceptance import report

    try:
        claim_out(args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)
    phases = []
    for name in PHASES:
        if name not in args.chosen:
            phases.append({"name": name, "status": "skipped", "reason": "not in --phases", "seconds": 0,
                           "tables": []})
            continue
        print(f"== {name} (time box {args.boxes[name]:g} s)", flush=True)
        phases.append(run_phase(args, name))
        print(report.status_line(phases[-1]), flush=True)
        pending = [{"name": n, "status": "skipped", "reason": "not reached (the command was stopped before it)",
                    "seconds": 0, "tables": []} for n in PHASES[len(phases):]]
        report.write(args.out, phases + pending, started, dry_run=args.dry_run)  # kept if the command is killed
    summary = report.write(args.out, phases, started, dry_run=args.dry_run)
    print(summary)
    failed = [p["name"] for p in phases if p["name"] in GATING and p["status"] == "fail"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
