"""The one state-dict unwrapper: model weights out of any checkpoint the project meets.

Accepted: a bare state dict (the original release's weights), our training checkpoints (``state_dict`` and
``state_dict_ema``, with ``eval_on_ema`` saying which one the run's metrics came from), timm's (``state_dict`` /
``state_dict_ema``) and ``{'model': ...}`` dicts. Prefixes ``module.`` (DataParallel/DDP) and ``_orig_mod.``
(torch.compile) are removed.

Which weights: ``use_ema=True`` requires the EMA weights, ``use_ema=False`` takes the plain ones, ``use_ema=None``
(default) follows the checkpoint: the EMA weights when it records ``eval_on_ema`` (its best metric came from them),
otherwise the plain weights, otherwise the EMA weights when they are the only ones.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

__all__ = ["unwrap_state_dict"]

_EMA_KEYS = ("state_dict_ema", "model_ema", "state_dict_ema_v3")
_PLAIN_KEYS = ("state_dict", "model")


def _first(ckpt: Dict, keys) -> Optional[Dict]:
    for key in keys:
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return None


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def unwrap_state_dict(ckpt: Any, use_ema: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """Model weights of ``ckpt`` (see the module docstring for which ones)."""
    if not isinstance(ckpt, dict):
        raise TypeError(f"checkpoint must be a dict, got {type(ckpt).__name__}")
    ema, plain = _first(ckpt, _EMA_KEYS), _first(ckpt, _PLAIN_KEYS)
    if use_ema and ema is None:
        raise ValueError("use_ema=True but the checkpoint holds no EMA weights (no 'state_dict_ema')")
    if use_ema is None:
        use_ema = ema is not None and (bool(ckpt.get("eval_on_ema")) or plain is None)
    sd = ema if use_ema else plain
    if sd is None:
        sd = ckpt  # a bare state dict
    return {_strip(k): v for k, v in sd.items()}
