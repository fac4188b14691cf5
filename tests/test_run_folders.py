"""Issue 31: a run never loses or overwrites a result. Resume continues in place only from a run folder's own
last.pth.tar of an unfinished run; zero-image evaluations are errors, never a metric or a best; validate.py does not
rank results from different data; the smaller items (non-dict checkpoints, a malformed index, the loaded-tensor count,
file modes, a non-UTF-8 --config). Tiny demo data keeps each run to CPU seconds."""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn as nn

import train
import validate
from training import cli, run_folder
from training.checkpoint import CheckpointError, CheckpointSaver, load_checkpoint, save_checkpoint
from training.data import DatasetError
from training.io import atomic_write


def common(demo_root, out, *extra):
    return ["--demo-root", demo_root, "--demo-train-per-class", "8", "--demo-val-per-class", "4",
            "--demo-img-size", "32", "-b", "16", "--workers", "0", "--log-interval", "0", "--epochs", "2",
            "--warmup-epochs", "0", "--output", str(out), "--seed", "3", "--deterministic", "--no-tensorboard", *extra]


def snapshot(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


# ------------------------------------------------------------------------------------ resume continues in place
def test_resume_from_a_users_state_dict_starts_a_new_run_folder(demo_root, tmp_path):
    first = train.main(common(demo_root, tmp_path / "out", "--experiment", "r", "--epochs", "1"))
    user = tmp_path / "u"
    user.mkdir()
    torch.save(load_checkpoint(os.path.join(first["output"], "last.pth.tar"))["state_dict"], user / "w.pth")
    (user / "args.yaml").write_text("mine: 1\n")
    (user / "summary.csv").write_text("my_col,other\n1,2\n")
    before = snapshot(user)
    res = train.main(common(demo_root, tmp_path / "out", "--resume", str(user / "w.pth"), "--epochs", "1"))
    assert snapshot(user) == before  # the user's folder is left exactly as it was
    assert os.path.dirname(res["output"]) == str(tmp_path / "out") and os.path.isfile(
        os.path.join(res["output"], "last.pth.tar"))
    recorded = load_checkpoint(os.path.join(res["output"], "last.pth.tar"))["args"]["resumed_from"]
    assert recorded == str(user / "w.pth")  # the new run records where it came from


def test_resume_never_rewrites_a_finished_run(demo_root, tmp_path):
    out = tmp_path / "out"
    train.main(common(demo_root, out, "--experiment", "f", "--checkpoint-hist", "3"))
    run = str(out / "f")
    before = snapshot(run)
    assert load_checkpoint(os.path.join(run, "last.pth.tar"))["epoch"] == 1
    # an epoch checkpoint of the finished run: a new folder, the run untouched (old main rewrote last.pth.tar)
    res = train.main(common(demo_root, out, "--experiment", "f", "--resume", os.path.join(run, "checkpoint-0.pth.tar")))
    assert res["output"] == run + "-1" and snapshot(run) == before
    # the finished run's own last.pth.tar, trained on for more epochs: also a new folder
    res = train.main(common(demo_root, out, "--resume", os.path.join(run, "last.pth.tar"), "--epochs", "3"))
    assert res["output"] != run and snapshot(run) == before
    assert [r["epoch"] for r in res["history"]] == [2]


def test_unfinished_runs_last_checkpoint_continues_in_place(demo_root, tmp_path):
    out = tmp_path / "out"
    train.main(common(demo_root, out, "--experiment", "p", "--stop-after-steps", "7"))
    run = str(out / "p")
    res = train.main(common(demo_root, out, "--resume", os.path.join(run, "last.pth.tar")))
    assert res["output"] == run and [r["epoch"] for r in res["history"]] == [1]
    with open(os.path.join(run, "summary.csv")) as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]


# ------------------------------------------------------------------------------------- zero-image evaluations
def _unreadable_val(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    for dirpath, _, files in os.walk(data / "val"):
        for f in files:
            with open(os.path.join(dirpath, f), "wb") as fh:
                fh.write(b"not an image")
    return str(data)


def test_evaluation_over_zero_images_is_an_error_not_a_best(demo_root, tmp_path):
    data = _unreadable_val(demo_root, tmp_path)
    res = train.main([data] + common(demo_root, tmp_path / "out", "--experiment", "z", "--eval-metric", "loss",
                                     "--bad-image", "skip"))
    assert "best_metric" not in res  # old main: loss 0.0 over 0 images became the best
    run = res["output"]
    assert not os.path.exists(os.path.join(run, "model_best.pth.tar"))
    index = os.path.join(run, "checkpoints.json")
    assert not os.path.exists(index) or json.loads(open(index).read())["best"] is None
    with open(os.path.join(run, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["eval_error"] for r in rows] == ["0 images evaluated"] * 2 and all(not r.get("eval_loss") for r in rows)
    assert load_checkpoint(os.path.join(run, "last.pth.tar"))["epoch"] == 1
    with pytest.raises(DatasetError, match="0 images evaluated"):
        validate.main([data, "--checkpoint", os.path.join(run, "last.pth.tar"), "--workers", "0"])


def test_validate_does_not_rank_results_from_different_data(capsys):
    rows = [{"model": "a", "checkpoint": "a.pth", "top1": 90.0, "data": "/d/small/val", "images": 40},
            {"model": "b", "checkpoint": "b.pth", "top1": 70.0, "data": "/d/big/val", "images": 600}]
    validate.print_best(rows)
    out = capsys.readouterr().out
    assert "best of" not in out and "not ranked" in out and "40 images" in out and "600 images" in out
    validate.print_best([dict(rows[1], model="c", top1=75.0), rows[1]])
    assert "best of 2: c" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- smaller items
def test_a_checkpoint_that_is_not_a_dict_is_one_clear_error(demo_root, tmp_path):
    path = str(tmp_path / "list.pth.tar")
    save_checkpoint([1, 2, 3], path)
    for option in ("--resume", "--initial-checkpoint"):
        with pytest.raises(CheckpointError, match=f"{option} .*list.pth.tar holds a list, not a checkpoint"):
            train.main(common(demo_root, tmp_path / "out", "--experiment", "x", option, path))


def test_malformed_checkpoint_index_is_a_checkpoint_error(tmp_path):
    for bad in ({"ranked": 5}, {"ranked": [[1.0, 0]]}, {"best": 3}, [1, 2]):
        (tmp_path / "checkpoints.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="checkpoints.json is malformed"):
            CheckpointSaver(str(tmp_path))


def test_initial_checkpoint_logs_the_tensors_actually_loaded(tmp_path):
    path = str(tmp_path / "other.pth")
    save_checkpoint({"weight": torch.randn(3, 2), "body.a": torch.randn(4), "body.b": torch.randn(5)}, path)
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("train")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        train.load_initial_weights(nn.Linear(2, 3), path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert any("1 of 2 tensors loaded" in m for m in records), records  # old main: "3 tensors loaded"


def test_written_files_follow_the_umask_and_keep_an_existing_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "new.csv"), "a\n")
        assert os.stat(tmp_path / "new.csv").st_mode & 0o777 == 0o644  # old main: 0600 whatever the umask
        (tmp_path / "kept.csv").write_text("x\n")
        os.chmod(tmp_path / "kept.csv", 0o664)
        atomic_write(str(tmp_path / "kept.csv"), "b\n")
        assert os.stat(tmp_path / "kept.csv").st_mode & 0o777 == 0o664
        save_checkpoint({"w": torch.randn(2)}, str(tmp_path / "c.pth.tar"))
        assert os.stat(tmp_path / "c.pth.tar").st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write(str(tmp_path / "private.json"), "{}")
        assert os.stat(tmp_path / "private.json").st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_non_utf8_config_names_the_option_and_the_file(tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(cli.UsageError, match=f"--config {cfg}: not a UTF-8 text file"):
        train.parse_args(["--config", str(cfg)])


# ------------------------------------------------------------------------------------ one folder per run (item 2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOLD = ("import sys, time; sys.path.insert(0, {root!r}); from training import run_folder; "
         "lock = run_folder.try_lock({folder!r}); print('held' if lock else 'busy', flush=True); time.sleep(60)")


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claims_racing_in_threads_never_share_a_folder(tmp_path):
    base = str(tmp_path / "race")
    n = 8
    gate = threading.Barrier(n)
    got, errors = [], []

    def claim():
        try:
            gate.wait()
            got.append(run_folder.claim_new(base, train._holds_run))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=claim) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    folders = sorted(lock.folder for lock in got)
    assert len(set(folders)) == n and base in folders and f"{base}-{n - 1}" in folders
    for lock in got:
        lock.release()
    # released, no run files: the folder is free again; a folder that holds a run is not
    atomic_write(os.path.join(base, "args.yaml"), "{}\n")
    again = run_folder.claim_new(base, train._holds_run)
    assert again.folder == f"{base}-1"
    again.release()


def test_two_training_processes_started_together_get_two_folders(demo_root, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                               *common(demo_root, out, "--experiment", "race1", "--epochs", "1", "--seed", str(seed))],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for seed in (7, 42)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    seeds = sorted(load_checkpoint(os.path.join(out, name, "last.pth.tar"))["args"]["seed"]
                   for name in ("race1", "race1-1"))
    assert seeds == [7, 42]  # one folder each: neither run's checkpoint overwrote the other's


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_log_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "started": "2026-12-07T10:00:00"}
    (run / run_folder.LOCK_NAME).write_text(json.dumps(stale))
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("ddf.run_folder").addHandler(handler)  # the 'ddf' loggers stop propagating once train.py ran
    try:
        lock = run_folder.claim_existing(str(run))
    finally:
        logging.getLogger("ddf.run_folder").removeHandler(handler)
    assert any(f"stale lock of pid {stale['pid']}" in m and "taking it over" in m for m in records), records
    assert json.loads((run / run_folder.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    # a new run with the same name takes over a stale lock of a folder that holds no run
    (run / run_folder.LOCK_NAME).write_text(json.dumps(stale))
    lock = run_folder.claim_new(str(run), train._holds_run)
    assert lock.folder == str(run)
    lock.release()


def test_lock_of_a_live_process_is_never_taken_over(tmp_path):
    run = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD.format(root=ROOT, folder=run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run_folder.RunFolderBusy, match="in use by another running train.py"):
            run_folder.claim_existing(run)
        lock = run_folder.claim_new(run, train._holds_run)
        assert lock.folder == run + "-1"
        lock.release()
    finally:
        holder.kill()
        holder.wait()
    # the holder was SIGKILLed: its lock is stale now and is taken over
    lock = run_folder.claim_existing(run)
    lock.release()
    # a live process of this host recorded in the file (no flock, e.g. another file system) also counts as live
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(run, run_folder.LOCK_NAME), "w") as f:
            json.dump({"pid": sleeper.pid, "host": socket.gethostname(), "started": "now"}, f)
        assert run_folder.try_lock(run) is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_resume_in_place_refuses_a_run_folder_in_use(demo_root, tmp_path):
    out = tmp_path / "out"
    train.main(common(demo_root, out, "--experiment", "u", "--stop-after-steps", "3"))
    run = str(out / "u")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD.format(root=ROOT, folder=run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(cli.UsageError, match="--resume: run folder .* is in use"):
            train.main(common(demo_root, out, "--resume", os.path.join(run, "last.pth.tar")))
    finally:
        holder.kill()
        holder.wait()
