"""A failed set-up leaves no run folder behind, and compile comes after DDP (issue 28 item 7).

The run folder is claimed (its run.lock, issue 31) before set-up; when set-up fails (bad data, bad model) the
folder is removed only if this run created it and it holds nothing but the lock (and the run's own args.yaml)."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import train
from training import run_folder
from training.data import DatasetError


def _bad_data_run(tmp_path, *extra):
    (tmp_path / "data").mkdir(exist_ok=True)  # no train/ split in it
    return ["--model", "resnet18", str(tmp_path / "data"), "--workers", "0", "--output", str(tmp_path / "out"),
            "--no-tensorboard", *extra]


def test_bad_data_leaves_no_run_folder(tmp_path):
    with pytest.raises(DatasetError, match="split folder not found"):
        train.main(_bad_data_run(tmp_path, "--experiment", "run"))
    assert os.listdir(tmp_path / "out") == []  # the run folder it claimed is gone (old main: 'run' with a run.lock)
    with pytest.raises(ValueError, match="--dataset 'wds/x' is not supported"):
        train.main(_bad_data_run(tmp_path, "--experiment", "run", "--dataset", "wds/x"))
    assert os.listdir(tmp_path / "out") == []


def test_a_folder_the_run_did_not_create_is_kept(tmp_path):
    mine = tmp_path / "out" / "mine"
    mine.mkdir(parents=True)  # made by the user before the run
    with pytest.raises(DatasetError):
        train.main(_bad_data_run(tmp_path, "--experiment", "mine"))
    assert os.listdir(mine) == [run_folder.LOCK_NAME]  # kept; the lock file marked released, never deleted
    assert json.loads((mine / run_folder.LOCK_NAME).read_text())["released"]


def test_a_folder_holding_other_files_is_kept(tmp_path, monkeypatch):
    def build_data(args, rt):  # another writer puts a file into the claimed folder, then set-up fails
        (tmp_path / "out" / "run" / "notes.txt").write_text("not ours")
        raise DatasetError("boom")
    monkeypatch.setattr(train, "build_data", build_data)
    with pytest.raises(DatasetError, match="boom"):
        train.main(_bad_data_run(tmp_path, "--experiment", "run"))
    assert sorted(os.listdir(tmp_path / "out" / "run")) == ["notes.txt", run_folder.LOCK_NAME]


def test_discard_removes_only_a_created_folder_holding_only_the_lock_and_args(tmp_path):
    lock = run_folder.try_lock(str(tmp_path / "new"))
    assert lock.created
    (tmp_path / "new" / "args.yaml").write_text("model: x\n")
    assert lock.discard() and not (tmp_path / "new").exists() and not lock.held
    (tmp_path / "old").mkdir()
    lock = run_folder.try_lock(str(tmp_path / "old"))
    assert not lock.created and not lock.discard() and not lock.held
    assert os.listdir(tmp_path / "old") == [run_folder.LOCK_NAME]
    again = run_folder.try_lock(str(tmp_path / "old"))  # released: free for the next run
    assert again is not None
    again.release()


def test_a_lock_file_discarded_while_claiming_is_not_taken(tmp_path, monkeypatch):
    """A claimer that opened run.lock just before a failed run removed it must not lock the unlinked file."""
    folder = tmp_path / "racy"
    flock = run_folder._flock

    def flock_after_discard(fd):
        os.unlink(folder / run_folder.LOCK_NAME)  # the failed run's discard, between our open and our flock
        return flock(fd)
    monkeypatch.setattr(run_folder, "_flock", flock_after_discard)
    assert run_folder.try_lock(str(folder)) is None


def test_torch_compile_is_applied_after_ddp(monkeypatch):
    calls = []

    class FakeDDP(nn.Module):
        def __init__(self, module, device_ids=None):
            super().__init__()
            calls.append(("ddp", type(module).__name__))
            self.module = module

    def fake_compile(model, backend=None):
        calls.append(("compile", type(model).__name__))
        return model
    monkeypatch.setattr(train.nn.parallel, "DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(train.torch, "compile", fake_compile)
    parts = SimpleNamespace(model=nn.Linear(2, 2))
    train.wrap_model(SimpleNamespace(torch_compile="eager"), parts,
                     SimpleNamespace(distributed=True, device=torch.device("cpu")))
    assert calls == [("ddp", "Linear"), ("compile", "FakeDDP")]  # timm's order: DDP, then compile the DDP module
    assert isinstance(parts.model, FakeDDP)
