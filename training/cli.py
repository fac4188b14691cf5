"""Command-line helpers shared by train.py, validate.py and test_time.py: a parser whose errors are one line,
YAML configs checked against the options' types, option value rules, key=value lists, and the CLI wrapper."""
from __future__ import annotations

import argparse
import ast
import math
import os
import signal
import sys
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import yaml


class UsageError(ValueError):
    """A bad command-line/config value; the message names the option and what is allowed."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise :class:`UsageError` (one line via :func:`run_cli`) instead of printing the
    usage block and exiting."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(message)


def parse_kv(items: Optional[Iterable[str]], what: str = "--model-kwargs") -> Dict:
    """``['se_ratio=0.3', 'filters=channel']`` -> ``{'se_ratio': 0.3, 'filters': 'channel'}``; values are Python
    literals when they parse (numbers, bools, None, tuples), else strings."""
    if isinstance(items, str):
        items = [items]
    out: Dict = {}
    for item in items or ():
        if not isinstance(item, str) or "=" not in item:
            raise UsageError(f"{what}: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise UsageError(f"{what}: empty key in {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------- configs
def _type_name(action: argparse.Action) -> str:
    t = action.type
    return {int: "an integer", float: "a number"}.get(t, "a string")


def _convert(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """A YAML value checked and converted like the command line would (types, nargs, choices, flags)."""
    opt = action.option_strings[-1] if action.option_strings else key
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: {key} ({opt}) must be true or false, got {value!r}")
        if isinstance(action, argparse._StoreConstAction) and not isinstance(action.const, bool):
            return action.const if value else action.default
        return value if not isinstance(action, argparse._StoreFalseAction) else not value
    if value is None:
        return None
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    values = value if isinstance(value, (list, tuple)) else [value]
    if not many and isinstance(value, (list, tuple, dict)):
        raise UsageError(f"{where}: {key} ({opt}) must be {_type_name(action)}, got {value!r}")
    out = []
    for v in values:
        if isinstance(v, (dict, list)) or isinstance(v, bool):
            raise UsageError(f"{where}: {key} ({opt}) must be {_type_name(action)}, got {v!r}")
        if action.type is int and not (isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())):
            raise UsageError(f"{where}: {key} ({opt}) must be an integer, got {v!r}")
        try:
            cv = action.type(v) if action.type is not None else str(v)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: {key} ({opt}) must be {_type_name(action)}, got {v!r}") from None
        if action.choices is not None and cv not in action.choices:
            raise UsageError(f"{where}: {key} ({opt}) must be one of {list(action.choices)}, got {v!r}")
        out.append(cv)
    if isinstance(action.nargs, int) and len(out) != action.nargs:
        raise UsageError(f"{where}: {key} ({opt}) needs {action.nargs} values, got {value!r}")
    return out if many else out[0]


def load_config(path: str, parser: argparse.ArgumentParser, special: Sequence[str] = ("model_kwargs",)
                ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Read a YAML file of option defaults. Returns (defaults for ``parser.set_defaults``, the ``special`` keys raw).
    Unknown keys and values of the wrong type are :class:`UsageError` naming the key."""
    if not os.path.isfile(path):
        raise UsageError(f"--config: file not found: {os.path.abspath(path)}")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path}: not a UTF-8 text file (byte {e.start}); save the YAML file as UTF-8") \
            from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--config {path}: expected a mapping of option: value, got {type(cfg).__name__}")
    actions: Dict[str, argparse.Action] = {}
    for a in parser._actions:  # the first option of a dest names it (--amp, not its alias --native-amp)
        actions.setdefault(a.dest, a)
    clean, raw = {}, {}
    for k, v in cfg.items():
        key = str(k).replace("-", "_")
        if key not in actions or key in ("config", "help"):
            raise UsageError(f"--config {path}: unknown option {k!r}")
        if key in special:
            raw[key] = v
        else:
            clean[key] = _convert(actions[key], str(k), v, f"--config {path}")
    return clean, raw


# ----------------------------------------------------------------------------------------------- value rules
def _rule_text(lo, hi, lo_open, hi_open) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts)


def check_range(args, name: str, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                allow_none: bool = True) -> None:
    """UsageError ``--name must be ... got X`` unless ``lo (<|<=) value (<|<=) hi`` (each element for lists); a
    nan or infinite float is always refused (``lo = hi = None``: only that check)."""
    value = getattr(args, name)
    if value is None and allow_none:
        return
    opt = "--" + name.replace("_", "-")
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(v, float) and not math.isfinite(v):
            rule = _rule_text(lo, hi, lo_open, hi_open)
            raise UsageError(f"{opt} must be a finite number{' ' + rule if rule else ''}, got {value!r}")
        bad = v is None
        bad = bad or (lo is not None and (v <= lo if lo_open else v < lo))
        bad = bad or (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            raise UsageError(f"{opt} must be {_rule_text(lo, hi, lo_open, hi_open)}, got {value!r}")


# ----------------------------------------------------------------------------------------------------- runner
def one_line(e: BaseException) -> str:
    """The message of ``e`` as one line. An exception re-raised from a DataLoader worker carries the worker's whole
    traceback ("Caught X in DataLoader worker process N. Original Traceback ..."): keep its last line, the cause."""
    text = str(e)
    if "in DataLoader worker process" in text and "Original Traceback" in text:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        if isinstance(e, (UsageError, ValueError)):  # ours (e.g. training.data.UnreadableImageError: ...): the text
            head, sep, rest = last.partition(": ")
            text = rest if sep and " " not in head else last
        else:
            text = f"a DataLoader worker failed: {last}"
    return " ".join(text.split("\n"))


def _worker_failure(e: BaseException) -> bool:
    return "in DataLoader worker process" in str(e) and "Original Traceback" in str(e)


_PEER_LOST = ("Connection closed by peer", "remote worker crash", "ncclRemoteError", "Connection reset by peer")


def _peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank of a distributed run stopped (its own error line says why)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # the process group may be torn down by now: ask the launcher
        return False
    return isinstance(e, getattr(dist, "DistError", ())) or any(m in str(e) for m in _PEER_LOST)


def run_cli(main: Callable[[], object], errors: Tuple[type, ...] = ()) -> None:
    """Run a script's ``main()``: a user error prints one line ``error: ...`` and exits with 2; an interrupted run
    that saved its state exits 128 + signal; a second Ctrl-C exits 130 without a traceback."""
    from .checkpoint import CheckpointError
    from .data import DatasetError
    try:
        result = main()
    except (UsageError, DatasetError, CheckpointError, FileNotFoundError, ValueError, *errors) as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - only a loader worker's or a lost peer's failure becomes one line
        if _worker_failure(e):
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        elif _peer_failure(e):
            print(f"error: stopped because another rank of the run stopped (its 'error:' line says why): "
                  f"{str(e).splitlines()[0][:300]}", file=sys.stderr, flush=True)
        else:
            raise
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    signum = result.get("signal") if isinstance(result, dict) else None
    if signum:
        sys.exit(128 + int(signum))
