"""One place that turns a checkpoint file's contents into a model state dict (torch only).

Used by the training scripts (``training/checkpoint.py``, ``validate.py``) and by the model factory for released
weights. Accepted inputs:

* a raw state dict (every value a tensor), e.g. the released DDF-ResNet weights;
* a training checkpoint: ours (``train.py``: ``state_dict``, ``state_dict_ema``, ``eval_on_ema``, ``arch`` ...),
  timm's (``state_dict``, ``state_dict_ema``) or others (``model``, ``model_ema``).

Which weights win (``use_ema``) -- one rule for every route (``validate.py``, ``tools/release.py``, pretrained
loading through ``timm.create_model``, ``train.py --initial-checkpoint``):

* ``None`` (default): the EMA weights whenever the checkpoint holds them, else the plain weights. This is the
  rule of timm's own loaders (``timm.models.load_state_dict`` / ``load_checkpoint`` with their default
  ``use_ema=True``, which ``create_model(pretrained_cfg_overlay=dict(file=...))`` and ``checkpoint_path=`` use
  before our filter sees the weights), so every route agrees; and it is what the runs measured: our
  ``train.py`` and timm's both evaluate and rank ``model_best`` by the EMA weights whenever EMA is on. The
  ``eval_on_ema`` record of our checkpoints does not change the choice (it is True exactly when EMA weights are
  saved).
* ``True``: the EMA weights (``state_dict_ema`` / ``model_ema``); an error when the checkpoint has none.
* ``False``: the plain weights (``state_dict`` / ``model``); an error when the checkpoint has only EMA weights.

Key prefixes added by wrappers are removed, repeatedly and in any order: ``module.`` (DataParallel /
DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

__all__ = ["unwrap_state_dict", "ema_chosen", "PLAIN_KEYS", "EMA_KEYS", "WRAPPER_PREFIXES"]

PLAIN_KEYS = ("state_dict", "model")
EMA_KEYS = ("state_dict_ema", "model_ema", "state_dict_ema_v3")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _first(ckpt: Dict[str, Any], keys) -> Optional[Dict[str, Any]]:
    for key in keys:
        value = ckpt.get(key)
        if isinstance(value, dict) and value:
            return value
    return None


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
    return key


def _is_raw(obj: Dict[str, Any]) -> bool:
    return bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _parts(obj: Any, use_ema: Optional[bool]):
    """(plain, ema, raw) weights of ``obj`` after the argument checks."""
    if use_ema not in (None, True, False):
        raise ValueError(f"use_ema must be None, True or False, got {use_ema!r}")
    if not isinstance(obj, dict):
        raise TypeError(f"a checkpoint must be a dict (state dict or training checkpoint), got {type(obj).__name__}")
    if _is_raw(obj):
        return None, None, obj
    plain, ema = _first(obj, PLAIN_KEYS), _first(obj, EMA_KEYS)
    if plain is None and ema is None:
        keys = sorted(str(k) for k in obj)[:12]
        raise ValueError(f"no model weights in the checkpoint: expected a state dict or one of the keys "
                         f"{PLAIN_KEYS + EMA_KEYS}, found keys {keys}")
    return plain, ema, None


def ema_chosen(obj: Any, use_ema: Optional[bool] = None) -> bool:
    """Whether :func:`unwrap_state_dict` takes the EMA weights of ``obj`` (the rule in the module docstring);
    ValueError when ``use_ema`` asks for weights the checkpoint does not hold."""
    plain, ema, raw = _parts(obj, use_ema)
    if raw is not None:
        if use_ema:
            raise ValueError("use_ema=True but the checkpoint is a bare state dict (no EMA weights)")
        return False
    if use_ema is None:
        return ema is not None
    if use_ema and ema is None:
        raise ValueError(f"use_ema=True but the checkpoint holds no EMA weights (none of {EMA_KEYS})")
    if not use_ema and plain is None:
        raise ValueError(f"use_ema=False but the checkpoint holds only EMA weights (none of {PLAIN_KEYS})")
    return use_ema


def unwrap_state_dict(obj: Any, use_ema: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """Model weights from a raw state dict or a training checkpoint; see the module docstring for the rules."""
    plain, ema, raw = _parts(obj, use_ema)
    take_ema = ema_chosen(obj, use_ema)  # checks use_ema against what the checkpoint holds
    sd = raw if raw is not None else (ema if take_ema else plain)
    return {_strip(str(k)): v for k, v in sd.items()}
