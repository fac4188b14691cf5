"""Rewrite a *trusted* checkpoint as plain data, so that it loads with ``torch.load(weights_only=True)``.

    python tools/convert_checkpoint.py IN.pth OUT.pth.tar

Loading IN runs any code its pickle holds (full unpickling): use it only on files you trust, once. The output keeps
dicts, lists, tuples, strings, numbers, booleans, None and tensors; ``argparse.Namespace`` becomes a dict, numpy
arrays and scalars become tensors and Python numbers; anything else is dropped and named on stderr. It is written
atomically with the project's checksum record (``training.checkpoint.save_checkpoint``), and an existing OUT is
never replaced.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_PLAIN = (str, int, float, bool, type(None), bytes)


def to_plain(obj: Any, where: str, dropped: List[str]) -> Any:
    """``obj`` as plain data (see the module docstring); appends the paths of dropped objects to ``dropped``."""
    import numpy as np
    import torch

    if isinstance(obj, (torch.Tensor,) + _PLAIN):
        return obj
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]", dropped) for k, v in obj.items() if isinstance(k, _PLAIN)}
    if isinstance(obj, (list, tuple)):
        out = [to_plain(v, f"{where}[{i}]", dropped) for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    dropped.append(f"{where} ({type(obj).__module__}.{type(obj).__qualname__})")
    return None


def main(argv=None) -> int:
    from training.checkpoint import save_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="the trusted checkpoint (loading it runs its code)")
    p.add_argument("dst", help="output file (must not exist)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.src):
        print(f"error: {args.src}: file not found", file=sys.stderr)
        return 2
    if os.path.exists(args.dst):
        print(f"error: {args.dst} exists; choose a new output file", file=sys.stderr)
        return 2
    import torch

    obj = torch.load(args.src, map_location="cpu", weights_only=False)
    dropped: List[str] = []
    plain = to_plain(obj, "checkpoint", dropped)
    for d in dropped:
        print(f"convert_checkpoint: dropped {d}", file=sys.stderr)
    save_checkpoint(plain, args.dst)
    print(f"wrote {args.dst} (plain data; {len(dropped)} object(s) dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
