"""Issue 31 item 3: the epoch-end save is one transaction. A run SIGKILLed at any step of an epoch-end save (as the
OOM killer or a scheduler after its grace period does) and then resumed ends with the same best, the same top-k and
the same summary.csv (one row per epoch) as a run that was never killed, and no temporary file is left.

Every run is a fork of one helper process that imported train.py once and never computes itself (so forking is
safe and cheap); a run is killed through the saver's ``DDF_TEST_KILL_AT=<step>:<epoch>`` hook, or, independently of
the saver's code, by a patched ``os.replace`` that kills the process as it renames the index into place. Tiny demo
data (10 classes x 8 train / 4 val images, 32 px), 3 epochs of 5 steps."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import select
import signal
import subprocess
import sys

import pytest

from training.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_ENV = "DDF_TEST_KILL_AT"
# the steps of an epoch-end save, in order (training.checkpoint.SAVE_STEPS; spelled out so that this file also runs,
# and fails, against a saver without them)
STEPS = ("staged-last", "staged-best", "staged-checkpoint", "staged-summary", "staged-index", "committed",
         "renamed-last", "renamed-best", "renamed-checkpoint", "renamed-summary", "pruned")

_SERVER = r"""
import json, os, signal, sys, traceback
sys.path.insert(0, sys.argv[1])
import train  # imported once; every run is a fork of this process, which itself never computes

def patch_replace(name, n):  # SIGKILL at the n-th os.replace onto a file called name
    real, seen = os.replace, [0]
    def replace(src, dst, *a, **k):
        if os.path.basename(str(dst)) == name:
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **k)
    os.replace = replace

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(job["env"])
            if job.get("kill_at_replace"):
                patch_replace(*job["kill_at_replace"])
            train.main(job["args"])
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                      "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


class Runner:
    """train.py runs, each a fork of the helper process; returns {"signal", "code"} and the run's log."""

    def __init__(self, log_dir):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
        env.pop(KILL_ENV, None)
        self.log_dir, self.n = log_dir, 0
        self.p = subprocess.Popen([sys.executable, "-c", _SERVER, ROOT], cwd=ROOT, env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def __call__(self, args, env=None, kill_at_replace=None, timeout=300):
        self.n += 1
        log = os.path.join(self.log_dir, f"run{self.n}.log")
        job = {"args": [str(a) for a in args], "env": env or {}, "log": log, "kill_at_replace": kill_at_replace}
        self.p.stdin.write(json.dumps(job) + "\n")
        self.p.stdin.flush()
        if not select.select([self.p.stdout], [], [], timeout)[0]:
            raise AssertionError(f"run {args} did not end in {timeout} s")
        res = json.loads(self.p.stdout.readline())
        with open(log) as f:
            res["log"] = f.read()
        return res

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(str(tmp_path_factory.mktemp("logs")))
    yield r
    r.close()


def run_args(demo_root, run, *extra):
    # --eval-metric loss: on this data epoch 1 is a new best, so its save writes every file (last, best, top-1,
    # summary) and prunes epoch 0's checkpoint: each step of the save happens (checked in `reference`)
    return ["--demo-root", demo_root, "--demo-train-per-class", "8", "--demo-val-per-class", "4",
            "--demo-img-size", "32", "-b", "16", "--workers", "0", "--log-interval", "0", "--epochs", "3",
            "--warmup-epochs", "0", "--output", os.path.dirname(run), "--experiment", os.path.basename(run),
            "--seed", "3", "--deterministic", "--no-tensorboard", "--eval-metric", "loss", "--checkpoint-hist", "1",
            *extra]


def _weights(path):
    sd = load_checkpoint(path)["state_dict"]
    return hashlib.sha256(b"".join(k.encode() + sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest()


def outcome(run):
    """What a finished run leaves: best and top-k per the index and on disk, summary rows (without the wall time),
    temporaries."""
    with open(os.path.join(run, "checkpoints.json")) as f:
        index = json.load(f)
    with open(os.path.join(run, "summary.csv"), newline="") as f:
        rows = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in csv.DictReader(f)]
    best = load_checkpoint(os.path.join(run, "model_best.pth.tar"))
    names = sorted(os.listdir(run))
    return {"best": index["best"], "ranked": index["ranked"], "model_best": [best["epoch"], best["metric"]],
            "model_best_weights": _weights(os.path.join(run, "model_best.pth.tar")),
            "top_k_files": [n for n in names if n.startswith("checkpoint-")],
            "top_k_weights": [_weights(os.path.join(run, n)) for n in names if n.startswith("checkpoint-")],
            "summary": rows, "last_epoch": load_checkpoint(os.path.join(run, "last.pth.tar"))["epoch"],
            "temporaries": [n for n in names if n.endswith(".tmp")]}


@pytest.fixture(scope="module")
def reference(runner, demo_root, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ref") / "ref")
    res = runner(run_args(demo_root, run))
    assert res == dict(res, signal=0, code=0), res["log"][-3000:]
    ref = outcome(run)
    losses = [float(r["eval_loss"]) for r in ref["summary"]]
    # the save of epoch 1 has every step: a new best that enters the top-1 and prunes checkpoint-0
    assert losses[1] < losses[0] and ref["best"][1] == 1 and ref["top_k_files"] == ["checkpoint-1.pth.tar"], losses
    assert [r["epoch"] for r in ref["summary"]] == ["0", "1", "2"] and ref["temporaries"] == []
    return ref


def test_the_steps_killed_here_are_the_savers():
    from training.checkpoint import SAVE_STEPS
    assert SAVE_STEPS == STEPS


def _resume_and_compare(runner, demo_root, run, reference):
    res = runner(run_args(demo_root, run, "--resume", os.path.join(run, "last.pth.tar")))
    assert res == dict(res, signal=0, code=0), res["log"][-3000:]
    assert f"output: {run} " in res["log"]  # continued in place
    got = outcome(run)
    assert got == reference
    return res["log"]


@pytest.mark.parametrize("kill_at", [f"{s}:1" for s in STEPS] + ["committed:0", "renamed-last:0"])
def test_sigkill_at_each_step_of_the_epoch_end_save_then_resume(runner, demo_root, tmp_path, reference, kill_at):
    run = str(tmp_path / "out" / "k")
    res = runner(run_args(demo_root, run), env={KILL_ENV: kill_at})
    assert res["signal"] == signal.SIGKILL, f"the run was not killed at {kill_at}: {res}\n{res['log'][-2000:]}"
    step, epoch = kill_at.split(":")
    committed = STEPS.index(step) >= STEPS.index("committed")
    with open(os.path.join(run, "checkpoints.json")) as f:
        assert json.load(f)["epoch"] == int(epoch) - (0 if committed else 1)  # killed where it was asked
    log = _resume_and_compare(runner, demo_root, run, reference)
    if step != "pruned":  # everything but a kill after the last step leaves something to finish or remove
        assert "was interrupted while saving" in log, log[-3000:]


def test_sigkill_while_the_index_is_renamed_into_place(runner, demo_root, tmp_path, reference):
    # the case, independent of the saver's hook: killed after the epoch's checkpoints are written, before
    # its index is in place (old main: model_best and top-k already replaced, the index and summary.csv not, so the
    # resumed run ranked against the stale index, lost checkpoint-0 and had no row for epoch 1)
    run = str(tmp_path / "out" / "i")
    res = runner(run_args(demo_root, run), kill_at_replace=["checkpoints.json", 2])
    assert res["signal"] == signal.SIGKILL, res["log"][-2000:]
    _resume_and_compare(runner, demo_root, run, reference)


def test_restart_keeps_older_rows_and_other_files_and_removes_only_its_own_temporaries(tmp_path):
    from training.checkpoint import CheckpointSaver
    run = tmp_path / "run"
    run.mkdir()
    # a run written before the index held the summary rows: its summary.csv rows are kept
    (run / "checkpoints.json").write_text(json.dumps({"ranked": [], "best": [1.0, 0]}))
    (run / "summary.csv").write_text("epoch,eval_top1,my_col\n0,1.0,x\n")
    mine = [".last.pth.tar.ab_c12xy.tmp", ".checkpoint-3.pth.tar.q1w2e3r4.tmp", ".summary.csv.zzzzzzzz.tmp"]
    others = ["notes.tmp", ".my.file.tmp", ".last.pth.tar.tmp.keep"]
    for name in mine + others:
        (run / name).write_bytes(b"partial")
    saver = CheckpointSaver(str(run), top_k=1)
    assert sorted(n for n in os.listdir(run) if "tmp" in n) == sorted(others)  # only the run's own temporaries
    saver.save_epoch({"epoch": 1}, 1, 2.0, {"epoch": 1, "eval_top1": 2.0})
    with open(run / "summary.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"epoch": "0", "eval_top1": "1.0", "my_col": "x"},
                                           {"epoch": "1", "eval_top1": "2.0", "my_col": ""}]
    (run / "summary.csv").write_text("epoch,eval_top1\n1,2.0\n")  # a row lost: rebuilt from the index
    CheckpointSaver(str(run), top_k=1)
    with open(run / "summary.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]
