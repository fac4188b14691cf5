"""Faults and careless use of the training scripts (issue 14), and the sampler / checkpoint-index gaps (issue 15).

Each test reproduces one fault: data loss, signals, damaged checkpoints, unsafe resumes, bad images, bad option
values. Tiny demo data (10 classes x 8 train / 4 val images, 32 px) keeps them to CPU seconds."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch
from PIL import Image

import train
import validate
from training import cli
from training.checkpoint import CheckpointError, CheckpointSaver, load_checkpoint, save_checkpoint
from training.data import DatasetError, ResumableSampler, collate_skip, create_dataset
from training.demo_data import DemoRootError, build_demo_dataset
from training.engine import evaluate
from training.runtime import ignore_stop_signals, stop_signals_blocked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ddf_log():
    """Messages of the 'ddf' loggers (they do not propagate to the root logger once train.py set up logging)."""
    import logging
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("ddf")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def tiny(demo_root, out, name, *extra):
    return ["--demo-root", demo_root, "--demo-train-per-class", "8", "--demo-val-per-class", "4",
            "--demo-img-size", "32", "-b", "16", "--workers", "0", "--log-interval", "0", "--epochs", "2",
            "--warmup-epochs", "0", "--output", str(out), "--experiment", name, "--seed", "3", "--deterministic",
            "--no-tensorboard", *extra]


def _snapshot(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


# ----------------------------------------------------------------------------------------- never lose data
def test_demo_root_on_a_user_folder_is_refused_and_left_intact(tmp_path):
    user = tmp_path / "my_photos"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "holiday.jpeg").write_bytes(b"precious")
    (user / "notes.txt").write_text("keep me")
    before = _snapshot(user)
    with pytest.raises(DemoRootError, match="not a demo dataset"):
        train.main(["--demo-root", str(user), "--output", str(tmp_path / "out"), "--workers", "0"])
    with pytest.raises(DemoRootError, match=str(user)):
        build_demo_dataset(str(user), train_per_class=1, val_per_class=1, img_size=8, verbose=False)
    assert _snapshot(user) == before
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder, and a demo-marked folder with other parameters, may be (re)built
    build_demo_dataset(str(empty), train_per_class=1, val_per_class=1, img_size=8, verbose=False)
    build_demo_dataset(str(empty), train_per_class=2, val_per_class=1, img_size=8, verbose=False)
    assert len(os.listdir(empty / "train" / "flat")) == 2


def test_copied_run_folder_never_prunes_the_original(tmp_path):
    orig = tmp_path / "run"
    saver = CheckpointSaver(str(orig), top_k=1)
    saver.save_epoch({"w": torch.randn(3)}, 0, 10.0)
    # an index in the format written before this fix: absolute paths into the original folder
    with open(orig / "checkpoints.json", "w") as f:
        json.dump({"ranked": [[10.0, 0, str(orig / "checkpoint-0.pth.tar")]], "best": [10.0, 0]}, f)
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    before = _snapshot(orig)
    copied = CheckpointSaver(str(copy), top_k=1)
    copied.save_epoch({"w": torch.randn(3)}, 1, 20.0)  # better: the copy's checkpoint-0 is pruned, not the original's
    assert _snapshot(orig) == before
    assert sorted(os.listdir(copy)) == ["checkpoint-1.pth.tar", "checkpoints.json", "last.pth.tar",
                                        "model_best.pth.tar"]
    index = json.loads((copy / "checkpoints.json").read_text())
    assert index["ranked"] == [[20.0, 1, "checkpoint-1.pth.tar"]]  # relative to the folder it lives in


def test_reused_experiment_name_keeps_the_earlier_run(demo_root, tmp_path, monkeypatch):
    first = train.main(tiny(demo_root, tmp_path, "exp", "--epochs", "1"))
    run = os.path.join(str(tmp_path), "exp")
    assert first["output"] == run
    before = _snapshot(run)

    def fail(*a, **k):
        raise RuntimeError("model construction failed")

    with monkeypatch.context() as m:  # the second run fails after choosing its folder (a bad --model is refused
        m.setattr(train, "build_model", fail)  # before that now, so the failure is made here)
        with pytest.raises(RuntimeError, match="model construction failed"):
            train.main(tiny(demo_root, tmp_path, "exp", "--epochs", "1"))
    assert _snapshot(run) == before
    second = train.main(tiny(demo_root, tmp_path, "exp", "--epochs", "1"))
    # the failed run stopped before writing anything into exp-1, so that empty folder is used now
    assert second["output"] == run + "-1" and _snapshot(run) == before


# ---------------------------------------------------------------------------------------------- signals
def _start(args, tmp_path, launcher=None):
    """train.py (or ``launcher + args``) in a new session (its own process group), logging to a file."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(tmp_path / f"log_{time.monotonic_ns()}.txt", "w+")
    cmd = (launcher or [sys.executable, os.path.join(ROOT, "train.py")]) + list(args)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return p, log


def _wait_for(p, log, text, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        log.seek(0)
        out = log.read()
        if text in out:
            return out
        if p.poll() is not None:
            raise AssertionError(f"exited {p.returncode} before {text!r}:\n{out[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timeout waiting for {text!r}")


def _stop_after_second_step(p, log, sig):
    """Send ``sig`` to the run's process group once step 2 is logged; the log after it exited 128+sig."""
    _wait_for(p, log, "Train: 0 [   2/")
    os.killpg(p.pid, sig)
    rc = p.wait(timeout=240)
    log.seek(0)
    out = log.read()
    assert rc == 128 + sig, out[-3000:]
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_process_group_saves_and_resume_continues(demo_root, tmp_path, sig):
    # loader workers (-j 1) share the process group, as under SLURM scancel / Kubernetes / Ctrl-C; many epochs so the
    # run is still going when the signal arrives, however slow the machine
    args = tiny(demo_root, tmp_path, "sig", "--epochs", "200", "--workers", "1", "--log-interval", "1")
    out = _stop_after_second_step(*_start(args, tmp_path), sig)
    assert "Traceback" not in out and f"received {sig.name}" in out and "resume with --resume" in out, out[-3000:]
    last = os.path.join(str(tmp_path), "sig", "last.pth.tar")
    ck = load_checkpoint(last)
    done = ck["epoch"] * 5 + (ck["step"] or 5)
    assert done >= 2
    # resume continues from there, and ends exactly where an uninterrupted run stopped at the same step ends
    stop_at = str(done + 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the interrupted run used 1 thread: bitwise equality holds for the same thread count
    try:
        res = train.main(tiny(demo_root, tmp_path, "sig", "--epochs", "200", "--resume", last,
                              "--stop-after-steps", stop_at))
        ref = train.main(tiny(demo_root, tmp_path, "ref", "--epochs", "200", "--stop-after-steps", stop_at))
    finally:
        torch.set_num_threads(threads)
    assert res["global_step"] == ref["global_step"] == done + 3
    a = load_checkpoint(os.path.join(str(tmp_path), "ref", "last.pth.tar"))["state_dict"]
    b = load_checkpoint(last)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _slow_worker_init(worker_id):
    time.sleep(1.0)  # a worker still starting: the window in which a stop signal used to kill it
    ignore_stop_signals(worker_id)


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask") or sys.platform == "darwin",
                    reason="signal masks of forked DataLoader workers (Linux)")
def test_loader_worker_survives_a_stop_signal_while_starting():
    """A SIGTERM that reaches a DataLoader worker before its worker_init_fn ran (torchrun signals each worker's
    process group) is held back and then ignored, so the loader keeps working; a worker killed there made one rank
    stop alone and the others hang in a collective (test_signal_to_torchrun_process_group_stops_cleanly, flaky)."""
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1,
                                         worker_init_fn=_slow_worker_init)
    with stop_signals_blocked():
        batches = iter(loader)
    os.kill(batches._workers[0].pid, signal.SIGTERM)  # during _slow_worker_init
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # the main process's mask is restored


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_torchrun_process_group_stops_cleanly(demo_root, tmp_path, sig):
    """distributed_train.sh: the signal reaches torchrun's agent, which forwards it to the workers; they save and
    the launcher exits 128+signal with one line instead of torchrun's SignalException traceback."""
    args = tiny(demo_root, tmp_path, "dsig", "--epochs", "200", "--workers", "1", "--log-interval", "1")
    out = _stop_after_second_step(*_start(args, tmp_path, [os.path.join(ROOT, "distributed_train.sh"), "2"]), sig)
    assert "Traceback" not in out and f"distributed_train.sh: stopped by {sig.name}" in out, out[-3000:]
    ck = load_checkpoint(os.path.join(str(tmp_path), "dsig", "last.pth.tar"))
    assert ck["epoch"] * 2 + (ck["step"] or 2) >= 2  # 2 steps per epoch with 2 processes


# ---------------------------------------------------------------------------------------- damaged files
def _flip_byte(path, where=0.6):
    data = bytearray(open(path, "rb").read())
    i = int(len(data) * where)
    data[i] ^= 0x20
    open(path, "wb").write(bytes(data))


def test_damaged_checkpoint_is_a_clear_error(tmp_path, ddf_log):
    path = str(tmp_path / "c.pth.tar")
    save_checkpoint({"state_dict": {"w": torch.randn(64, 64)}, "epoch": 1}, path)
    assert load_checkpoint(path)["epoch"] == 1
    _flip_byte(path, 0.5)  # inside the tensor data: torch.load alone would return other numbers
    with pytest.raises(CheckpointError, match="damaged") as ei:
        load_checkpoint(path)
    assert os.path.abspath(path) in str(ei.value)
    old = str(tmp_path / "old.pth")  # written without the checksum record: zip CRCs still catch a flip
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, old)
    assert load_checkpoint(old)["state_dict"]["w"].shape == (64, 64)
    assert any("no stored checksum" in m for m in ddf_log)
    _flip_byte(old, 0.5)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(old)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_checkpoint(str(tmp_path / "junk.pth"))


# ------------------------------------------------------------------------------------------- resume checks
def test_resume_refuses_other_batch_size_world_or_data(demo_root, tmp_path):
    train.main(tiny(demo_root, tmp_path, "r", "--stop-after-steps", "2"))
    last = os.path.join(str(tmp_path), "r", "last.pth.tar")
    with pytest.raises(cli.UsageError, match="--batch-size 16 -> 8"):
        train.main(tiny(demo_root, tmp_path, "r", "--resume", last, "-b", "8"))
    with pytest.raises(cli.UsageError, match="--seed 3 -> 4"):
        train.main(tiny(demo_root, tmp_path, "r", "--resume", last, "--seed", "4"))
    ck = load_checkpoint(last)
    ck["run"]["world_size"] = 2  # as if saved by a 2-process run
    save_checkpoint(ck, last)
    with pytest.raises(cli.UsageError, match="processes 2 -> 1"):
        train.main(tiny(demo_root, tmp_path, "r", "--resume", last))
    other = str(tmp_path / "other_demo")
    build_demo_dataset(other, train_per_class=9, val_per_class=4, img_size=32, verbose=False)
    args = tiny(demo_root, tmp_path, "r", "--resume", last, "--demo-train-per-class", "9")
    args[1] = other
    with pytest.raises(cli.UsageError, match="training data differ"):
        train.main(args)


def test_resume_at_epoch_boundary_with_other_batch_size_is_allowed(demo_root, tmp_path):
    train.main(tiny(demo_root, tmp_path, "e", "--epochs", "1"))
    last = os.path.join(str(tmp_path), "e", "last.pth.tar")
    ck = load_checkpoint(last)
    res = train.main(tiny(demo_root, tmp_path, "e", "--resume", last, "-b", "8"))
    assert res["global_step"] == 1 * 10 + 10 and len(res["history"]) == 1  # epoch 1 now has 10 steps of 8
    # a checkpoint as written before run signatures and checksums still resumes
    del ck["run"]
    ck["version"] = 1
    old = os.path.join(str(tmp_path), "old", "last.pth.tar")
    os.makedirs(os.path.dirname(old))
    torch.save(ck, old)
    res = train.main(tiny(demo_root, tmp_path, "old", "--resume", old))
    assert res["global_step"] == 10 and res["history"][0]["epoch"] == 1


# ----------------------------------------------------------------------------------------------- bad images
def _png_header_only(path, width, height):
    """A PNG whose header announces width x height pixels (no pixel data): opening it trips PIL's bomb check."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def _folder(tmp_path, classes=("a", "b"), n=3):
    for c in classes:
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(tmp_path / "train" / c / f"{i}.jpeg")
    return tmp_path


def test_decompression_bomb_is_skipped_and_named(tmp_path, ddf_log):
    _folder(tmp_path)
    bomb = tmp_path / "train" / "a" / "bomb.png"
    _png_header_only(bomb, 40000, 40000)  # 1.6 G pixels > 2 x PIL's MAX_IMAGE_PIXELS
    ds = create_dataset(str(tmp_path), "train", bad_image="skip")
    idx = [p for p, _ in ds.reader.samples].index(str(bomb))
    img, label = ds[idx]
    assert any(str(bomb) in m and "DecompressionBomb" in m for m in ddf_log)
    assert img.size == (8, 8) and label == ds.reader.samples[(idx + 1) % len(ds)][1]  # the next image
    strict = create_dataset(str(tmp_path), "train", bad_image="error")
    with pytest.raises(DatasetError, match=str(bomb)):
        strict[idx]


def test_symlink_loops_are_not_followed(tmp_path, ddf_log):
    _folder(tmp_path)
    os.symlink(str(tmp_path / "train"), str(tmp_path / "train" / "a" / "loop"))  # back to the split folder
    os.symlink(str(tmp_path / "train" / "a"), str(tmp_path / "train" / "b" / "also_a"))  # into another class
    os.symlink("self", str(tmp_path / "train" / "b" / "self"))  # a link to itself (ELOOP)
    (tmp_path / "train" / "b" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "b" / "more" / "x.jpeg")  # a real subfolder still counts
    t0 = time.time()
    ds = create_dataset(str(tmp_path), "train")
    assert time.time() - t0 < 30
    assert ds.classes == ["a", "b"] and len(ds) == 7
    assert sorted(label for _, label in ds.reader.samples) == [0, 0, 0, 1, 1, 1, 1]
    assert any("symlink loop" in m for m in ddf_log)


def test_validation_skips_unreadable_images_once_and_counts_them(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (200 * (c == "a"), 50 * i, 100)).save(tmp_path / "val" / c / f"{i}.png")
    (tmp_path / "val" / "a" / "1.png").write_bytes(b"broken")
    import torchvision.transforms as T
    ds = create_dataset(str(tmp_path), "val", substitute=False)
    ds.transform = T.ToTensor()
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_skip)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 2))
    m = evaluate(model, loader, torch.device("cpu"))
    assert (m["count"], m["skipped"]) == (5, 1)
    with torch.no_grad():  # the metric is over the 5 readable images exactly
        xs = torch.stack([ds[i][0] for i in range(6) if ds[i] is not None])
        ys = torch.tensor([ds[i][1] for i in range(6) if ds[i] is not None])
        ref = torch.nn.functional.cross_entropy(model(xs), ys).item()
    assert m["loss"] == pytest.approx(ref, rel=1e-6)


# ----------------------------------------------------------------------------------------- output paths first
def test_output_paths_are_checked_before_the_work(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    import test_time
    monkeypatch.setattr(test_time, "copy_bandwidth", lambda *a: pytest.fail("measured before checking outputs"))
    with pytest.raises(SystemExit):
        test_time.main(["--device", "cpu", "--quiet", "--csv", str(blocker / "r.csv")])
    monkeypatch.setattr(validate, "validate_one", lambda *a: pytest.fail("validated before checking outputs"))
    with pytest.raises(ValueError, match="--results-file"):
        validate.main(["--checkpoint", "x.pth.tar", "--results-file", str(blocker / "r.json")])
    demo = tmp_path / "demo_not_built"
    with pytest.raises(ValueError, match="--output"):
        train.main(["--output", str(blocker), "--demo-root", str(demo), "--workers", "0"])
    assert not demo.exists()


# -------------------------------------------------------------------------------------- bad option values
@pytest.mark.parametrize("argv,yaml_text,match", [
    (["--epochs", "0"], None, "--epochs must be >= 1, got 0"),
    (["--smoothing", "1.5"], None, "--smoothing must be >= 0.0 and < 1.0, got 1.5"),
    (["--crop-pct", "0"], None, "--crop-pct must be > 0.0 and <= 1.0"),
    (["--batch-size", "x"], None, "--batch-size"),
    ([], "epochs: 1.5\n", "epochs (--epochs) must be an integer, got 1.5"),
    ([], "model_kwargs: 5\n", "model_kwargs must be a mapping"),
    ([], "bad_image: maybe\n", "must be one of ['skip', 'error']"),
    ([], "amp: 3\n", "amp (--amp) must be true or false"),
], ids=["epochs0", "smoothing", "crop_pct", "batch_type", "yaml_epochs_float", "yaml_model_kwargs", "yaml_choice",
        "yaml_flag"])
def test_bad_option_values_name_the_option(tmp_path, argv, yaml_text, match):
    if yaml_text is not None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml_text)
        argv = ["--config", str(cfg), "/data"] + argv
    with pytest.raises(cli.UsageError) as ei:
        train.parse_args(argv)
    assert match in str(ei.value)


def test_bad_values_from_the_command_line_give_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--epochs", "0"], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == "error: --epochs must be >= 1, got 0", p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, os.path.join(ROOT, "validate.py"), "--model", "resnet18", "--crop-pct", "0"],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "--crop-pct must be > 0.0 and <= 1.0" in p.stderr and "Traceback" not in p.stderr
    for args, msg in ((["0"], "NPROC (processes per node) must be an integer >= 1, got '0'"),
                      (["2", "--nnodes"], "--nnodes needs a value (e.g. --nnodes 2)"),
                      (["2", "--nnodes", "--epochs", "1"], "--nnodes needs a value (e.g. --nnodes 2)")):
        p = subprocess.run([os.path.join(ROOT, "distributed_train.sh"), *args], capture_output=True, text=True,
                           timeout=60, env=dict(env, PYTHON="false"))
        assert p.returncode == 2 and p.stderr.strip() == f"error: {msg}", p.stderr


# ---------------------------------------------------------------------------------- sampler, checkpoint index
def test_sampler_shuffles_each_epoch_differently_and_resumes_exactly():
    s = ResumableSampler(50, shuffle=True, seed=7)
    epochs = []
    for e in range(4):
        s.set_epoch(e)
        epochs.append(list(s))
    assert all(sorted(o) == list(range(50)) for o in epochs)
    assert len({tuple(o) for o in epochs}) == 4  # every epoch has its own order
    s.set_epoch(2)
    assert list(s) == epochs[2]  # an epoch's order depends only on (seed, epoch)
    s.set_epoch(2, start=13)
    assert list(s) == epochs[2][13:] and len(s) == 37
    shards = [ResumableSampler(50, seed=7, num_replicas=3, rank=r) for r in range(3)]
    for sh in shards:
        sh.set_epoch(1)
    got = sorted(i for sh in shards for i in sh)
    assert len(got) == 51 and set(got) == set(range(50))  # padded by one repeat, every sample covered


def test_checkpoint_index_write_is_atomic(tmp_path, monkeypatch):
    saver = CheckpointSaver(str(tmp_path), top_k=2)
    saver.save_epoch({"e": 0}, 0, 1.0)
    before = (tmp_path / "checkpoints.json").read_text()
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("checkpoints.json"):
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        saver.save_epoch({"e": 1}, 1, 2.0)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints.json").read_text() == before
    assert json.loads(before)["best"] == [1.0, 0]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_ties_keep_the_earliest_epoch(tmp_path):
    saver = CheckpointSaver(str(tmp_path), top_k=2)
    for epoch, metric in enumerate([10.0, 30.0, 30.0, 20.0, 30.0]):
        saver.save_epoch({"epoch": epoch}, epoch, metric)
    assert saver.best == (30.0, 1)  # an equal metric never replaces the best: the earliest epoch wins
    assert [r[1] for r in saver.ranked] == [1, 2]  # epoch 4 (30.0) is not strictly better than the worst kept
    assert load_checkpoint(str(tmp_path / "model_best.pth.tar"))["epoch"] == 1
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("checkpoint-")) == \
        ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar"]
    loss = CheckpointSaver(str(tmp_path / "loss"), top_k=1, decreasing=True)
    for epoch, metric in enumerate([0.5, 0.4, 0.4]):
        loss.save_epoch({"epoch": epoch}, epoch, metric)
    assert loss.best == (0.4, 1)


# ------------------------------------------------------------------------------------- timm dataset readers
def test_tar_split_through_timms_reader_matches_the_folder(tmp_path):
    import tarfile
    _folder(tmp_path, classes=("a", "b", "c"), n=2)
    (tmp_path / "val").mkdir()
    with tarfile.open(tmp_path / "val.tar", "w") as tf:  # val as a tar with class folders inside
        tf.add(str(tmp_path / "train"), arcname=".")
    folder = create_dataset(str(tmp_path), "train")
    shutil.rmtree(tmp_path / "val")
    tar = create_dataset(str(tmp_path), "val")
    assert type(tar.reader).__name__ == "ReaderImageInTar" and tar.source.endswith("val.tar")
    assert tar.classes == folder.classes == ["a", "b", "c"] and len(tar) == len(folder) == 6
    from training.data import fingerprint
    assert fingerprint(tar)["files_sha256"] == fingerprint(folder)["files_sha256"]  # same names and labels
    import numpy as np
    by_name = {os.path.relpath(p, tmp_path / "train"): i for i, (p, _) in enumerate(folder.reader.samples)}
    for i in range(len(tar)):
        img, label = tar[i]
        ref_img, ref_label = folder[by_name[os.path.normpath(tar.reader.filename(i))]]
        assert label == ref_label and np.array_equal(np.asarray(img), np.asarray(ref_img))


def test_other_dataset_readers_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="cannot be resumed exactly"):
        create_dataset(str(tmp_path), "train", dataset="wds/shards")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the package were not installed
    with pytest.raises(DatasetError, match="needs the Hugging Face 'datasets' package"):
        create_dataset(str(tmp_path), "train", dataset="hfds/some/name")


def test_hugging_face_dataset_trains_and_resumes(demo_root, tmp_path):
    """--dataset hfds/<path>: a local image-folder dataset through Hugging Face datasets and timm's ReaderHfds
    (no network); the HF split is named 'validation'; a wrong split name is a clear error; resume continues."""
    cache, hf = str(tmp_path / "hf_cache"), "hfds/" + demo_root
    with pytest.raises(DatasetError, match="no split 'val'.*--val-split"):
        create_dataset(cache, "val", dataset=hf)
    ds = create_dataset(cache, "train", dataset=hf)
    assert len(ds) == 80 and len(ds.classes) == 10
    args = ["--dataset", hf, "--val-split", "validation", "--model", "ddf_mul_resnet_tiny", "--img-size", "32",
            "-b", "16", "--workers", "0", "--epochs", "2", "--warmup-epochs", "0", "--output", str(tmp_path),
            "--seed", "3", "--no-tensorboard", "--num-classes", "10"]
    first = train.main([cache, *args, "--experiment", "hf", "--stop-after-steps", "3"])
    assert first["global_step"] == 3 and first["interrupted"]
    res = train.main([cache, *args, "--experiment", "hf", "--resume", os.path.join(first["output"], "last.pth.tar")])
    assert res["global_step"] == 10 and len(res["history"]) >= 1 and res["best_metric"] >= 0


def test_demo_root_keeps_a_users_file_in_a_demo_folder_with_other_parameters(tmp_path):
    """Issue 30 item 2: a folder with a ddf_demo.json of other parameters plus the user's mine.txt is refused and kept
    whole (it used to be replaced, mine.txt lost); a demo build of its own files only is still rebuilt."""
    root = tmp_path / "ddf_demo"
    build_demo_dataset(str(root), train_per_class=1, val_per_class=1, img_size=8, verbose=False)
    (root / "mine.txt").write_text("keep me")
    (root / "train" / "flat" / "extra.jpeg").write_bytes(b"mine too")
    before = _snapshot(root)
    for call in (lambda: build_demo_dataset(str(root), train_per_class=2, val_per_class=1, img_size=8, verbose=False),
                 lambda: train.main(["--demo-root", str(root), "--demo-train-per-class", "2", "--demo-val-per-class",
                                     "1", "--demo-img-size", "8", "--output", str(tmp_path / "out"),
                                     "--workers", "0"])):
        with pytest.raises(DemoRootError, match="mine.txt|extra.jpeg") as ei:
            call()
        assert str(root) in str(ei.value) and "\n" not in str(ei.value)
    assert _snapshot(root) == before and (root / "mine.txt").read_text() == "keep me"
    (root / "mine.txt").unlink()
    (root / "train" / "flat" / "extra.jpeg").unlink()
    build_demo_dataset(str(root), train_per_class=2, val_per_class=1, img_size=8, verbose=False)
    assert len(os.listdir(root / "train" / "flat")) == 2


def test_demo_root_unwritable_is_one_line(tmp_path, monkeypatch):
    """Issue 30 item 2: a read-only --demo-root parent is one DemoRootError line (was a raw OSError). The session runs
    as root, where chmod does not stop writes, so the read-only file system is simulated at mkdtemp."""
    import errno
    import tempfile as _tempfile

    def _ro(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(_tempfile, "mkdtemp", _ro)
    root = tmp_path / "ro" / "ddf_demo"
    with pytest.raises(DemoRootError, match="cannot write the demo dataset") as ei:
        build_demo_dataset(str(root), train_per_class=1, val_per_class=1, img_size=8, verbose=False)
    assert "Read-only file system" in str(ei.value) and str(root) in str(ei.value)
