"""What train.py / validate.py hand to timm, checked before the work: the model name and its kwargs (built once on
the meta device: no memory, no weights), ``--input-size C H W`` (the model's ``in_chans``, the images' mode and the
normalisation's length), ``--interpolation`` / ``--train-interpolation``, ``--aa`` and mixup/CutMix with the batch
size. A value timm would refuse later with a traceback (AssertionError, KeyError, TypeError, RuntimeError) is a
:class:`training.cli.UsageError` naming the option. Also: does a state dict fit a model (one line when not)."""
from __future__ import annotations

import contextlib
import re
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from .cli import UsageError

CHANNELS = (1, 3)  # the images are decoded as 'L' or 'RGB' (training.data.to_model_mode)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert('L') uses: how a 1-channel image is made from RGB


# ---------------------------------------------------------------------------------------------- input channels
def input_channels(input_size: Optional[Sequence[int]], option: str = "--input-size") -> int:
    """C of ``--input-size C H W`` (3 when not given); UsageError unless 1 (grayscale) or 3 (RGB)."""
    if input_size is None:
        return 3
    c = int(input_size[0])
    if c not in CHANNELS:
        raise UsageError(f"{option} {' '.join(str(v) for v in input_size)}: the first value is the number of image "
                         f"channels and must be 1 (grayscale) or 3 (RGB), got {c}")
    return c


def check_norm_lengths(mean, std, chans: int) -> None:
    """``--mean`` / ``--std`` need 1 value (used for every channel) or one per channel."""
    for name, v in (("--mean", mean), ("--std", std)):
        if v is not None and len(v) not in (1, chans):
            want = ("1 value (--input-size 1 H W: one channel)" if chans == 1 else
                    f"1 value or {chans} (one per channel)")
            raise UsageError(f"{name} needs {want}, got {len(v)}: {list(v)}")


def fit_channels(data_config: Dict) -> Dict:
    """``data_config`` with mean/std of one entry per input channel. The model's defaults are RGB (3 values): for 1
    channel they become the luma-weighted average (the grayscale image is ``0.299 R + 0.587 G + 0.114 B``, so its
    mean is that of the RGB means; the std is weighted the same way, an approximation)."""
    chans = int(data_config["input_size"][0])
    out = dict(data_config)
    for key in ("mean", "std"):
        v = tuple(float(x) for x in out[key])
        if len(v) == chans:
            continue
        if len(v) == 1:
            out[key] = v * chans
        elif chans == 1 and len(v) == 3:
            out[key] = (round(sum(w * x for w, x in zip(LUMA, v)), 4),)
        else:
            raise UsageError(f"--{key} has {len(v)} values but --input-size has {chans} channels")
    return out


# ------------------------------------------------------------------------------------- transforms, mixup
def interpolation_names() -> Tuple[str, ...]:
    from timm.data.transforms import _str_to_torch_interpolation  # the names timm's str_to_interp_mode knows

    return tuple(_str_to_torch_interpolation)


def check_interpolation(value: Optional[str], option: str, allow_random: bool = False) -> None:
    """``value`` is '' / None (the model's default) or a name timm knows; ``random`` for the training resize."""
    names = interpolation_names() + (("random",) if allow_random else ())
    if value and value not in names:
        raise UsageError(f"{option} must be one of {', '.join(names)}, got {value!r}")


def check_auto_augment(policy: Optional[str]) -> None:
    """``--aa``: timm parses the policy string only when the training transform is built; build one now."""
    if not policy:
        return
    from timm.data import create_transform
    try:
        create_transform((3, 32, 32), is_training=True, auto_augment=policy)
    except Exception as e:  # noqa: BLE001 - timm asserts (AssertionError) or fails to parse a number (ValueError)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--aa {policy!r} is not an AutoAugment policy timm knows ({why}); e.g. rand-m9-mstd0.5, "
                         f"rand-m7-n2-mstd0.5-inc1, augmix-m5-w3, original, v0, 3a") from None


def check_mixup_batch(batch_size: int, mixup: float, cutmix: float) -> None:
    """timm's Mixup (batch mode) pairs each sample with its mirror in the batch: the batch size must be even."""
    if (mixup > 0 or cutmix > 0) and batch_size % 2:
        used = " and ".join(o for o, v in (("--mixup", mixup), ("--cutmix", cutmix)) if v > 0)
        raise UsageError(f"-b/--batch-size {batch_size} must be even with {used} (timm's Mixup mixes each sample "
                         f"with its mirror in the batch)")


# ------------------------------------------------------------------------------------------------- the model
_FIXED = ("num_classes", "drop_rate", "drop_path_rate", "pretrained")  # set by range-checked options, not named
_UNEXPECTED = re.compile(r"unexpected keyword argument '([^']+)'")


def _model_error(name: str, kwargs: Mapping, sources: Mapping[str, str], e: BaseException) -> UsageError:
    """One line naming the option behind the create_model failure ``e``. ``sources``: kwarg -> option text."""
    msg = " ".join(str(e).split()) or type(e).__name__
    m = _UNEXPECTED.search(msg) if isinstance(e, TypeError) else None
    if m:
        key = m.group(1)
        where = sources.get(key, f"--model-kwargs {key}={kwargs.get(key)!r}")
        if key == "in_chans":
            return UsageError(f"{where}: model {name!r} cannot be built for {kwargs[key]} input channels (it takes "
                              f"no in_chans); use 3 channels or another --model")
        return UsageError(f"{where}: model {name!r} takes no argument {key!r} ({msg})")
    given = ", ".join(sources.get(k, f"--model-kwargs {k}={v!r}") for k, v in kwargs.items() if k not in _FIXED)
    return UsageError(f"--model {name!r} cannot be built{' with ' + given if given else ''}: "
                      f"{type(e).__name__}: {msg}")


def check_model_name(name, option: str = "--model") -> None:
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        raise UsageError(f"{option} {name!r}: no such timm model (the DDF-ResNets are ddf_mul_resnet18/34/50/101/152, "
                         f"ddf_add_resnet..., ddf_mul_resnet_tiny; timm.list_models('*resnet*') lists timm's)")


def create_model(name: str, kwargs: Mapping, sources: Optional[Mapping[str, str]] = None, **fixed):
    """``timm.create_model(name, **fixed, **kwargs)`` whose failures are a UsageError naming the option (``sources``
    maps a kwarg to the option that set it; unlisted kwargs came from ``--model-kwargs``)."""
    import timm

    check_model_name(name)
    try:
        return timm.create_model(name, **fixed, **kwargs)
    except Exception as e:  # noqa: BLE001 - TypeError (unknown kwarg), ValueError/AssertionError (bad value) ...
        raise _model_error(name, {**fixed, **kwargs}, sources or {}, e) from None


def first_conv_channels(model) -> Optional[int]:
    """Input channels of the model's first conv (its pretrained_cfg 'first_conv'), or None when it is not found."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    for path in ([first] if isinstance(first, str) else list(first or ())):
        try:
            return int(model.get_submodule(path.rsplit(".weight", 1)[0]).in_channels)
        except (AttributeError, TypeError, ValueError):
            continue
    return None


def check_model(name: str, kwargs: Mapping, sources: Mapping[str, str], chans: int, convert: Optional[Mapping] = None,
                convert_sources: Optional[Mapping[str, str]] = None, **fixed) -> Optional[Dict]:
    """Build the model once on the meta device (no memory or weights) so that every value given to timm's
    create_model is checked before a run folder exists; with ``chans`` != 3 the first conv must take ``chans``.
    ``convert``: the ``--convert-kwargs`` (``--convert`` given), converted on that model too; returns their
    :func:`convert_settings` (None without ``convert``)."""
    try:
        with torch.device("meta"):
            model = create_model(name, kwargs, sources, **fixed)
    except UsageError as e:
        if "meta" not in str(e).lower():
            raise
        model = create_model(name, kwargs, sources, **fixed)  # its __init__ computes on tensors: build it for real
    got = first_conv_channels(model)
    if got is not None and got != chans:
        raise UsageError(f"{sources.get('in_chans', '--input-size')}: model {name!r} was asked for {chans} input "
                         f"channels but its first conv takes {got}")
    if convert is None:
        return None
    settings = convert_settings(model, convert, convert_sources or {})
    on_meta = any(p.is_meta for p in model.parameters())  # else built for real above: its DDF layers too
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        convert_model(model, name, settings, convert_sources or {})
    return settings


# ----------------------------------------------------------------------------------------- --convert (ddf.convert)
CONVERT_POLICIES = ("auto", "paper", "all")  # auto: 'paper' on a timm ResNet, else 'all' (every eligible conv)
_CONVERT_FIXED = ("inplace", "input_size")  # chosen by train.py / validate.py, not options


def convert_defaults() -> Dict:
    """Every ``ddf.convert`` option a run can set (``--convert-kwargs``) with its default; ``policy``: 'auto'."""
    import inspect

    import ddf

    params = inspect.signature(ddf.convert).parameters.values()
    out = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _CONVERT_FIXED}
    out["policy"] = "auto"
    return out


def _is_timm_resnet(model) -> bool:
    try:
        from timm.models.resnet import ResNet
    except ImportError:
        return False
    return isinstance(model, ResNet)


def _patterns(value, where: str):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(f"{where}: must be an fnmatch pattern on the layer names (e.g. 'layer[34].*') or a list of "
                     f"them (e.g. ['layer3.*', 'layer4.*']), got {value!r}")


def convert_settings(model, given: Mapping, sources: Mapping[str, str]) -> Dict:
    """The full, explicit ``ddf.convert`` settings of a run: every option (defaults filled in, so that a checkpoint
    rebuilds the same model whatever later defaults are), ``policy`` 'auto' resolved on ``model`` to 'paper' (timm
    ResNets: the layout of ``ddf_*_resnet*``) or 'all'. ``sources``: option -> the text that set it."""
    settings = convert_defaults()
    unknown = [k for k in given if k not in settings]
    if unknown:
        k = unknown[0]
        raise UsageError(f"{sources.get(k, f'--convert-kwargs {k}={given[k]!r}')}: ddf.convert has no option {k!r} "
                         f"(options: {', '.join(sorted(settings))})")
    settings.update(given)
    where = {k: sources.get(k, f"--convert-kwargs {k}={v!r}") for k, v in settings.items()}
    policy = "all" if settings["policy"] is None else settings["policy"]
    if policy not in CONVERT_POLICIES:
        raise UsageError(f"{where['policy']}: policy must be one of {', '.join(CONVERT_POLICIES)} (auto: paper on a "
                         f"timm ResNet, else all)")
    if policy == "auto":
        policy = "paper" if _is_timm_resnet(model) else "all"
    settings["policy"] = policy
    for k in ("include", "exclude"):
        settings[k] = _patterns(settings[k], where[k])
    return settings


_SELECTION_WORDS = ("include", "exclude", "policy", "min_channels", "head=", "se_ratio=")  # why ddf.convert kept it
_CONVERT_OPTION = re.compile(r"^ddf\.convert: (\w+)")


def convert_model(model, name: str, settings: Mapping, sources: Mapping[str, str], input_size=None):
    """``ddf.convert(model, **settings)`` in place; returns its report. A value ddf.convert refuses is a UsageError
    naming the option; a model in which nothing is eligible too (a run asked to be converted never trains the plain
    model under a converted run's name)."""
    import ddf

    kwargs = {**settings, "policy": None if settings["policy"] == "all" else settings["policy"]}
    try:
        model, report = ddf.convert(model, **kwargs, input_size=input_size)
    except (TypeError, ValueError) as e:
        m = _CONVERT_OPTION.match(str(e))
        key = m.group(1) if m else ""
        where = sources.get(key, f"--convert-kwargs {key}={settings[key]!r}" if key in settings else "--convert")
        raise UsageError(f"{where}: {' '.join(str(e).split())}") from None
    if not report.changed:
        chosen = [kv for kv in report.skipped.items() if any(w in kv[1] for w in _SELECTION_WORDS)]
        kept = (chosen or list(report.skipped.items()) or [None])[0]  # a layer the options left out, if any
        first = f"; first: {kept[0]}: {kept[1]}" if kept else ""
        given = " ".join(f"{k}={v!r}" for k, v in settings.items() if k in sources)
        raise UsageError(f"--convert: nothing eligible in model {name!r}{' with ' + given if given else ''} "
                         f"({len(report.skipped)} k x k conv(s) kept{first}); drop --convert or change "
                         f"--convert-kwargs")
    return model, report


def convert_summary(report) -> str:
    """The report's head (layers replaced, params and FLOPs before/after) as one line, without the layer list."""
    lines = [ln.strip() for ln in str(report).splitlines()
             if not ln.startswith(("  replaced ", "  kept ", "  FLOPs not counted (input_size=None)"))]
    return "; ".join(lines)


# ------------------------------------------------------------------------------------------------ state dicts
def state_dict_mismatch(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """None when ``sd`` loads into ``model`` strictly; otherwise one line: how many tensors differ in shape (with
    the first), which keys are missing / unexpected."""
    own = model.state_dict()
    shape = [k for k, v in sd.items() if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if not (shape or missing or unexpected):
        return None
    parts = []
    if shape:
        k = shape[0]
        parts.append(f"{len(shape)} tensor(s) differ in shape (first: {k} {list(sd[k].shape)} in the file, "
                     f"{list(own[k].shape)} in the model)")
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {what} key(s) ({', '.join(_first(keys))})")
    return "; ".join(parts)


def _first(keys: Iterable[str], n: int = 3):
    keys = list(keys)
    return keys[:n] + ([f"... {len(keys) - n} more"] if len(keys) > n else [])
