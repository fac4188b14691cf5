"""Released weights: a run (or one checkpoint) -> the model's weights alone, as ``<model>-<sha8>.safetensors``
(and ``.pth``), and reading such a file back. ``tools/release.py`` is the command line; ``validate.py`` reads the
files with :func:`read_release`.

A release holds only tensors (the model's state dict, chosen by :func:`ddf.state_dict.ema_chosen`'s rule, the
same as validate.py's and pretrained loading's: the EMA weights when the checkpoint has them, unless
``use_ema=False``; or the mean of the run's N best top-k checkpoints) and string metadata (:data:`META_KEYS`):
``model``, ``top1`` (the top-1 the run measured on exactly these weights, ``not measured`` for an average),
``epoch``, ``args_sha256`` (of the run's recorded options), ``weights`` and what ``validate.py`` needs to give the
run's number again: ``num_classes``, ``class_names``, ``model_kwargs``, ``data_config``, for a run of
``train.py --convert`` ``convert`` (its ddf.convert settings) and, for a demo run, ``demo`` (where the demo data was
built), all JSON. Files are written to temporaries and linked onto their final names,
never over an existing file; on any error nothing is left.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from ddf.state_dict import ema_chosen, unwrap_state_dict

from .checkpoint import BEST_NAME, INDEX_NAME, CheckpointError, is_run_folder, load_checkpoint, read_index, \
    write_verified
from .io import fsync_dir, remove_quietly, write_temp

__all__ = ["ReleaseError", "Release", "from_source", "write_release", "read_release", "META_KEYS"]

META_KEYS = ("format", "model", "top1", "epoch", "args_sha256", "weights", "source", "num_classes", "class_names",
             "model_kwargs", "data_config", "convert", "demo")
NOT_MEASURED = "not measured"
_DEMO_KEYS = ("demo_root", "demo_train_per_class", "demo_val_per_class", "demo_img_size")


class ReleaseError(ValueError):
    """A bad input of a release; the message starts with the argument it is about."""


class Release:
    """The weights and metadata of one release (nothing written yet)."""

    def __init__(self, model: str, state_dict: Dict[str, torch.Tensor], metadata: Dict[str, str]):
        self.model, self.state_dict, self.metadata = model, state_dict, metadata


def _args_dict(ckpt: Dict) -> Dict:
    a = ckpt.get("args") or {}
    return a if isinstance(a, dict) else vars(a)


def args_sha256(ckpt: Dict) -> str:
    """sha256 of the checkpoint's recorded options (JSON, sorted keys; non-JSON values by their str())."""
    return hashlib.sha256(json.dumps(_args_dict(ckpt), sort_keys=True, default=str).encode()).hexdigest()


def _load(path: str, arg: str) -> Dict:
    """A train.py checkpoint (dict with 'arch' and model weights), loaded safely; ReleaseError naming ``arg``."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise ReleaseError(f"{arg}: {e}") from None
    if not isinstance(ckpt, dict) or not ckpt.get("arch") or not isinstance(ckpt.get("state_dict"), dict):
        what = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"a dict with keys {sorted(map(str, ckpt))[:8]}"
        raise ReleaseError(f"{arg}: {os.path.abspath(path)} is not a train.py checkpoint (it holds {what}; "
                           f"expected 'arch' and 'state_dict')")
    return ckpt


def _weights(ckpt: Dict, use_ema: Optional[bool], arg: str) -> Tuple[Dict[str, torch.Tensor], bool]:
    """(state dict, is EMA) by ``ddf.state_dict``'s rule (None: EMA when present); ReleaseError naming ``arg``."""
    try:
        ema = ema_chosen(ckpt, use_ema)
    except ValueError as e:
        raise ReleaseError(f"{arg}: {e}") from None
    sd = unwrap_state_dict(ckpt, use_ema=ema)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}, ema


def _top1(ckpt: Dict, ema: bool, rows: Optional[List[Dict]]) -> str:
    """The top-1 the run measured on these weights: the checkpoint's metrics when they were measured on them, else
    its epoch's summary row (``ema_eval_top1`` / ``eval_top1``) from the index next to it, when that row agrees with
    the checkpoint's own metrics (the same run); ``not measured`` otherwise (e.g. a mid-epoch checkpoint)."""
    metrics = ckpt.get("metrics") or {}
    if int(ckpt.get("step") or 0) or "top1" not in metrics:
        return NOT_MEASURED
    measured_on_ema = bool(ckpt.get("eval_on_ema"))
    if measured_on_ema == ema:
        return repr(float(metrics["top1"]))
    own = "ema_eval_top1" if measured_on_ema else "eval_top1"
    key = "ema_eval_top1" if ema else "eval_top1"
    for row in rows or ():
        if str(row.get("epoch")) == str(ckpt.get("epoch")) and row.get(key) not in (None, ""):
            if row.get(own) in (None, "") or float(row[own]) != float(metrics["top1"]):
                break
            return repr(float(row[key]))
    return NOT_MEASURED


def _metadata(ckpt: Dict, ema: bool, top1: str, epoch: str, weights: str, source: str) -> Dict[str, str]:
    args = _args_dict(ckpt)
    meta = {"format": "pt", "model": str(ckpt["arch"]), "top1": top1, "epoch": epoch,
            "args_sha256": args_sha256(ckpt), "weights": weights, "source": source,
            "num_classes": str(ckpt.get("num_classes") or ""),
            "class_names": json.dumps(list(ckpt.get("class_names") or [])),
            "model_kwargs": json.dumps(dict(ckpt.get("model_kwargs") or {}), default=str),
            "data_config": json.dumps(dict(ckpt.get("data_config") or {}), default=str)}
    if ckpt.get("convert"):
        meta["convert"] = json.dumps(dict(ckpt["convert"]))
    if args.get("demo"):
        meta["demo"] = json.dumps({k: args.get(k) for k in _DEMO_KEYS})
    return meta


def _index_rows(folder: str) -> Optional[List[Dict]]:
    path = os.path.join(folder, INDEX_NAME)
    try:
        return read_index(path)["rows"] if os.path.isfile(path) else None
    except CheckpointError:
        return None


def _average(folder: str, n: int, use_ema: Optional[bool]) -> Release:
    """The mean of the ``n`` best checkpoints the run folder's index ranks (float tensors averaged in float64 and
    cast back; integer tensors, e.g. BatchNorm's ``num_batches_tracked``, from the best one)."""
    index_path = os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(index_path):
        raise ReleaseError(f"--average {n}: run folder {folder} has no {INDEX_NAME} (no top-k checkpoints)")
    try:
        ranked = read_index(index_path)["ranked"]
    except CheckpointError as e:
        raise ReleaseError(f"--average {n}: {e}") from None
    if len(ranked) < n:
        raise ReleaseError(f"--average {n}: run folder {folder} holds {len(ranked)} top-k checkpoint(s) in "
                           f"{INDEX_NAME}, fewer than {n} (train with --checkpoint-hist {n} or more)")
    names = [name for _, _, name in ranked[:n]]
    ckpts = [_load(os.path.join(folder, name), f"--average {n}") for name in names]
    archs = sorted({c["arch"] for c in ckpts})
    if len(archs) > 1:
        raise ReleaseError(f"--average {n}: the checkpoints are of different models {archs}")
    states = [_weights(c, use_ema, f"--average {n}") for c in ckpts]
    emas = {e for _, e in states}
    if len(emas) > 1:
        raise ReleaseError(f"--average {n}: some of the checkpoints have EMA weights and some do not; use --no-ema")
    mean = _mean([s for s, _ in states], names, f"--average {n}")
    what = f"average of {n} ({'ema' if emas == {True} else 'plain'})"
    epochs = ",".join(str(c.get("epoch")) for c in ckpts)
    return Release(ckpts[0]["arch"], mean, _metadata(ckpts[0], emas == {True}, NOT_MEASURED, epochs, what,
                                                     ",".join(names)))


def _mean(states: List[Dict[str, torch.Tensor]], names: List[str], arg: str) -> Dict[str, torch.Tensor]:
    """Float tensors: the mean in float64, cast back to their dtype; other tensors: the first (best) state's."""
    best = states[0]
    for s, name in zip(states, names):
        if set(s) != set(best) or any(s[k].shape != v.shape for k, v in best.items()):
            raise ReleaseError(f"{arg}: the weights in {name} differ in keys or shapes from those in {names[0]}")
    return {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in best.items()}


def from_source(source: str, average: Optional[int] = None, use_ema: Optional[bool] = None) -> Release:
    """A release of ``source`` (a run folder: its ``model_best.pth.tar``, or one checkpoint file), or of the mean of
    a run folder's ``average`` best top-k checkpoints. :class:`ReleaseError` naming the argument on bad input."""
    arg = "RUN_DIR_OR_CHECKPOINT"
    if not os.path.exists(source):
        raise ReleaseError(f"{arg}: {os.path.abspath(source)} does not exist")
    folder = os.path.abspath(source) if os.path.isdir(source) else None
    if folder is not None and not is_run_folder(folder):
        raise ReleaseError(f"{arg}: {folder} is a folder but not a train.py run folder (no args.yaml)")
    if average is not None:
        if average < 1:
            raise ReleaseError(f"--average must be at least 1, got {average}")
        if folder is None:
            raise ReleaseError(f"--average {average}: needs a run folder (its {INDEX_NAME}), got the file {source}")
        return _average(folder, average, use_ema)
    path = os.path.join(folder, BEST_NAME) if folder else source
    if folder and not os.path.isfile(path):
        raise ReleaseError(f"{arg}: run folder {folder} has no {BEST_NAME} (no epoch with a metric finished yet)")
    ckpt = _load(path, arg)
    sd, ema = _weights(ckpt, use_ema, arg)
    top1 = _top1(ckpt, ema, _index_rows(os.path.dirname(os.path.abspath(path))))
    meta = _metadata(ckpt, ema, top1, str(ckpt.get("epoch", "")), "ema" if ema else "plain", os.path.basename(path))
    return Release(ckpt["arch"], sd, meta)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safetensors_bytes(state_dict: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> bytes:
    """``safetensors.torch.save`` with its JSON header rewritten in sorted key order (safetensors writes the header's
    maps in a random order), so the same weights and metadata always give the same bytes, hence the same file name.
    The header stays a valid safetensors header: 8-byte little-endian length, JSON, padded with spaces to 8 bytes;
    tensor offsets are relative to the data after it, which is unchanged."""
    from safetensors.torch import save

    raw = save(state_dict, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


def _link_new(tmp: str, final: str) -> None:
    """Put ``tmp`` at ``final`` only if nothing is there (hard link: atomic and never replaces); ReleaseError when
    ``final`` exists."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise ReleaseError(f"--out: {final} exists; it is kept as it is (remove it or choose another --out)") from None
    except OSError:  # a file system without hard links: check, then rename
        if os.path.exists(final):
            raise ReleaseError(f"--out: {final} exists; it is kept as it is (remove it or choose another --out)") \
                from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


def write_release(rel: Release, out_dir: str, pth: bool = False) -> List[str]:
    """Write ``<model>-<sha8>.safetensors`` (and ``.pth``: the same state dict, torch.save + checksum record) into
    ``out_dir``; returns the paths. All files are complete or none is there."""
    os.makedirs(out_dir, exist_ok=True)
    writers = [(".safetensors", safetensors_bytes(rel.state_dict, rel.metadata))]
    if pth:
        writers.append((".pth", lambda t: write_verified(rel.state_dict, t)))
    temps: List[Tuple[str, str]] = []
    done: List[str] = []
    try:
        for ext, write in writers:
            tmp = write_temp(os.path.join(out_dir, rel.model + ext), write)
            temps.append((tmp, os.path.join(out_dir, f"{rel.model}-{_sha256(tmp)[:8]}{ext}")))
        for tmp, final in temps:
            _link_new(tmp, final)
            done.append(final)
        fsync_dir(out_dir)
    except BaseException:
        for tmp, _ in temps:
            remove_quietly(tmp)
        for final in done:
            remove_quietly(final)
        raise
    return done


def read_release(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, info) of a ``.safetensors`` file; info has ``arch``, ``num_classes``, ``class_names``,
    ``model_kwargs``, ``data_config``, ``convert``, ``args`` (the demo's settings for a demo run), ``metadata`` (all
    of it); keys a file written elsewhere lacks are None / empty. :class:`CheckpointError` naming the file when missing or
    damaged."""
    from safetensors import safe_open

    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise CheckpointError(f"checkpoint not found: {full}")
    try:
        with safe_open(full, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise CheckpointError(f"checkpoint {full} is damaged or not a safetensors file: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None

    def js(key, default):
        try:
            return json.loads(meta[key]) if meta.get(key) else default
        except ValueError:
            raise CheckpointError(f"checkpoint {full}: metadata {key!r} is not JSON") from None

    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in js("data_config", {}).items()}
    num = meta.get("num_classes")
    info = {"arch": meta.get("model") or None, "num_classes": int(num) if num and num.isdigit() else None,
            "class_names": js("class_names", []) or None, "model_kwargs": js("model_kwargs", {}),
            "data_config": data_config or None, "args": js("demo", {}), "convert": js("convert", None),
            "metadata": meta}
    return sd, info
