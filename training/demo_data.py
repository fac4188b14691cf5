"""Procedurally drawn demo dataset: 10 classes of textures (default) or shapes, as real JPEG files.

``kind='textures'`` (default, used by the demo): each image holds a patch of one texture (the class: stripes in
four orientations, checkerboard, dots, rings, grid, spokes, flat) at a random position and size, with random
colours, period, phase, small rotation, background clutter lines and pixel noise. Textures are local patterns, so
a small CNN learns them in a few CPU minutes. ``kind='shapes'``: one shape (circle, star, ...) with random
position, size, rotation and colours, drawn with PIL ImageDraw (harder: needs far more epochs).
Files are written in the same layout as ImageNet::

    <root>/train/<class>/<n>.jpeg
    <root>/val/<class>/<n>.jpeg

The build is deterministic for a given seed, happens once, and is atomic: it is written into a temporary sibling
folder that is renamed into place only when complete, so an interrupted build never leaves a half dataset behind.

Safety: the dataset is built only where nothing of the user's can be lost: a folder that does not exist, an empty
folder, or a folder marked as a demo dataset by its ``ddf_demo.json`` that holds only what that build wrote (the
marker's parameters are its manifest; such a build with other parameters is replaced). Any other existing path, or
a demo folder with a file the build did not write, is refused with a :class:`DemoRootError` naming it; nothing is
deleted. A folder that cannot be written is one DemoRootError line too.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from typing import Dict, Optional, Tuple

from PIL import Image, ImageDraw, ImageFilter

CLASSES = (
    "circle", "square", "triangle", "star", "plus",
    "ring", "diamond", "hexagon", "frame", "crescent",
)

DEFAULT_ROOT = os.path.join("data", "ddf_demo")


class DemoRootError(ValueError):
    """``--demo-root`` points at something that is not ours to replace (a non-empty folder without the demo
    marker, or a file)."""
TEXTURE_CLASSES = (
    "hstripes", "vstripes", "diagonal", "antidiagonal", "checker",
    "dots", "rings", "grid", "spokes", "flat",
)

DEFAULTS = dict(train_per_class=300, val_per_class=60, img_size=32, seed=0, kind="textures", version=2)
_MARKER = "ddf_demo.json"


def _rand_colour(rng: random.Random) -> Tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))


def _far_colour(rng: random.Random, ref: Tuple[int, int, int], min_dist: int = 160) -> Tuple[int, int, int]:
    for _ in range(100):
        c = _rand_colour(rng)
        if sum(abs(a - b) for a, b in zip(c, ref)) >= min_dist:
            return c
    return tuple(255 - v for v in ref)


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float = 0.0):
    pts = []
    steps = n * 2 if inner else n
    for i in range(steps):
        rad = r if (not inner or i % 2 == 0) else r * inner
        a = rot + 2 * math.pi * i / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_shape(label: int, size: int, rng: random.Random) -> Image.Image:
    """Draw one sample of class ``label`` as a ``size`` x ``size`` RGB image."""
    bg = _rand_colour(rng)
    fg = _far_colour(rng, bg)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    # background clutter: a few thin random lines in a colour near the background
    for _ in range(rng.randint(0, 3)):
        clutter = tuple(max(0, min(255, v + rng.randint(-60, 60))) for v in bg)
        d.line([(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)], fill=clutter, width=1)
    r = rng.uniform(0.22, 0.38) * size
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    rot = rng.uniform(0, 2 * math.pi)
    w = max(2, int(r * rng.uniform(0.28, 0.4)))
    name = CLASSES[label]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "square":
        d.polygon(_polygon(cx, cy, r * 1.15, 4, rot), fill=fg)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.15, 3, rot), fill=fg)
    elif name == "star":
        d.polygon(_polygon(cx, cy, r * 1.2, 5, rot, inner=0.42), fill=fg)
    elif name == "plus":
        t = r * 0.32
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fg)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fg)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=w)
    elif name == "diamond":  # elongated rhombus
        a = r * 1.2
        b = r * 0.6
        pts = [(a, 0), (0, b), (-a, 0), (0, -b)]
        c, s = math.cos(rot), math.sin(rot)
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=fg)
    elif name == "hexagon":
        d.polygon(_polygon(cx, cy, r * 1.1, 6, rot), fill=fg)
    elif name == "frame":  # hollow square
        d.polygon(_polygon(cx, cy, r * 1.2, 4, rot), outline=fg, width=w)
    elif name == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        off = r * 0.55
        ox, oy = cx + off * math.cos(rot), cy + off * math.sin(rot)
        d.ellipse([ox - r * 0.9, oy - r * 0.9, ox + r * 0.9, oy + r * 0.9], fill=bg)
    else:  # pragma: no cover
        raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label}")
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.0)))
    # additive pixel noise
    noise_amp = rng.randint(5, 30)
    noise = Image.frombytes("L", (size, size), rng.randbytes(size * size)).convert("RGB")
    img = Image.blend(img, noise, noise_amp / 255.0)
    return img


def draw_texture(label: int, size: int, rng: random.Random) -> Image.Image:
    """Draw one sample of texture class ``label`` as a ``size`` x ``size`` RGB image."""
    import numpy as np
    if not 0 <= label < len(TEXTURE_CLASSES):
        raise ValueError(f"label must be in [0, {len(TEXTURE_CLASSES)}), got {label}")
    name = TEXTURE_CLASSES[label]
    outside = _rand_colour(rng)
    c0 = _rand_colour(rng)
    c1 = _far_colour(rng, c0)
    img = Image.new("RGB", (size, size), outside)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 3)):
        d.line([(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)], fill=_rand_colour(rng), width=1)
    # the textured patch: random size (55-100% of each side) and position
    pw, ph = (max(4, int(size * rng.uniform(0.55, 1.0))) for _ in range(2))
    px, py = rng.randint(0, size - pw), rng.randint(0, size - ph)
    period = rng.uniform(0.13, 0.28) * size
    theta = math.radians(rng.uniform(-12, 12))
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float64)
    xx += rng.uniform(0, period)
    yy += rng.uniform(0, period)
    xr = xx * math.cos(theta) - yy * math.sin(theta)
    yr = xx * math.sin(theta) + yy * math.cos(theta)
    w = 2 * math.pi / period
    if name == "hstripes":
        mask = np.sin(w * yr) > 0
    elif name == "vstripes":
        mask = np.sin(w * xr) > 0
    elif name == "diagonal":
        mask = np.sin(w * (xr + yr) / math.sqrt(2)) > 0
    elif name == "antidiagonal":
        mask = np.sin(w * (xr - yr) / math.sqrt(2)) > 0
    elif name == "checker":
        mask = np.sin(w * xr) * np.sin(w * yr) > 0
    elif name == "dots":
        fx, fy = np.mod(xr, period) - period / 2, np.mod(yr, period) - period / 2
        mask = fx ** 2 + fy ** 2 < (0.3 * period) ** 2
    elif name == "rings":
        cx, cy = rng.uniform(0, pw), rng.uniform(0, ph)
        mask = np.sin(w * np.hypot(xx - cx, yy - cy)) > 0
    elif name == "grid":
        lw = max(1.0, 0.22 * period)
        mask = (np.mod(xr, period) < lw) | (np.mod(yr, period) < lw)
    elif name == "spokes":
        cx, cy = rng.uniform(0.3 * pw, 0.7 * pw), rng.uniform(0.3 * ph, 0.7 * ph)
        n = rng.randint(5, 9)
        mask = np.sin(n * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * math.pi)) > 0
    else:  # flat
        mask = np.zeros((ph, pw), dtype=bool)
    patch = np.where(mask[..., None], np.array(c1, np.uint8), np.array(c0, np.uint8)).astype(np.uint8)
    img.paste(Image.fromarray(patch, "RGB"), (px, py))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.2, 0.6)))
    noise = Image.frombytes("L", (size, size), rng.randbytes(size * size)).convert("RGB")
    return Image.blend(img, noise, rng.randint(5, 30) / 255.0)


def class_names(kind: str = "textures"):
    if kind not in ("textures", "shapes"):
        raise ValueError(f"kind must be 'textures' or 'shapes', got {kind!r}")
    return TEXTURE_CLASSES if kind == "textures" else CLASSES


def _params(**overrides) -> Dict:
    p = dict(DEFAULTS)
    p.update({k: v for k, v in overrides.items() if v is not None})
    return p


def is_built(root: str, **overrides) -> bool:
    marker = os.path.join(root, _MARKER)
    if not os.path.isfile(marker):
        return False
    try:
        with open(marker) as f:
            return json.load(f) == _params(**overrides)
    except (OSError, ValueError):
        return False


def _own_files(params: Dict) -> set:
    """The relative paths a demo build with ``params`` writes (its manifest: the marker's parameters name them)."""
    names = class_names(params["kind"])
    files = {_MARKER}
    for split, n in (("train", params["train_per_class"]), ("val", params["val_per_class"])):
        files.add(split)
        files.update(os.path.join(split, c) for c in names)
        files.update(os.path.join(split, c, f"{c}_{i:05d}.jpeg") for c in names for i in range(n))
    return files


def _foreign_file(root: str) -> Optional[str]:
    """The first path under ``root`` that a demo build (as its marker describes it) did not write, or None."""
    try:
        with open(os.path.join(root, _MARKER)) as f:
            own = _own_files(_params(**json.load(f)))
    except (OSError, ValueError, TypeError, KeyError) as e:
        return f"{_MARKER} (unreadable: {e})"
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in own or (name in dirnames and os.path.islink(os.path.join(dirpath, name))):
                return rel
    return None


def check_demo_root(root: str) -> None:
    """Raise DemoRootError unless ``root`` is missing, an empty folder, or a demo build holding only the files that
    build wrote (a folder with anything else in it is refused, so nothing of the user's is ever replaced)."""
    root = os.path.abspath(root)
    if not os.path.lexists(root):
        return
    if os.path.islink(root) or not os.path.isdir(root):
        raise DemoRootError(f"--demo-root {root} exists and is not a folder; give a new or empty folder")
    if not os.listdir(root):
        return
    if not os.path.isfile(os.path.join(root, _MARKER)):
        raise DemoRootError(f"--demo-root {root} is a non-empty folder that is not a demo dataset (no {_MARKER}); "
                            f"refusing to build there so nothing in it is replaced: give a new or empty folder")
    foreign = _foreign_file(root)
    if foreign is not None:
        raise DemoRootError(f"--demo-root {root} is a demo dataset that also holds {foreign}, which the demo build "
                            f"did not write; refusing to rebuild there so it is kept: move it out or give a new "
                            f"or empty folder")


def _draw_all(tmp: str, params: Dict, names, draw) -> None:
    for split, n, split_seed in (("train", params["train_per_class"], params["seed"]),
                                 ("val", params["val_per_class"], params["seed"] + 1_000_003)):
        for label, name in enumerate(names):
            cdir = os.path.join(tmp, split, name)
            os.makedirs(cdir)
            rng = random.Random(split_seed * 1000 + label)
            for i in range(n):
                draw(label, params["img_size"], rng).save(os.path.join(cdir, f"{name}_{i:05d}.jpeg"), quality=90)
    with open(os.path.join(tmp, _MARKER), "w") as f:
        json.dump(params, f)


def build_demo_dataset(root: str = DEFAULT_ROOT, train_per_class: int = None, val_per_class: int = None,
                       img_size: int = None, seed: int = None, verbose: bool = True, kind: str = None) -> str:
    """Build the demo dataset under ``root`` unless an identical one is already there. Returns ``root``.
    Refuses (DemoRootError) a ``root`` that holds anything but an earlier demo build."""
    params = _params(train_per_class=train_per_class, val_per_class=val_per_class, img_size=img_size, seed=seed,
                     kind=kind)
    for key in ("train_per_class", "val_per_class", "img_size"):
        if not isinstance(params[key], int) or params[key] < (8 if key == "img_size" else 1):
            raise ValueError(f"--demo-{key.replace('_', '-')} must be an integer >= "
                             f"{8 if key == 'img_size' else 1}, got {params[key]!r}")
    names = class_names(params["kind"])
    draw = draw_texture if params["kind"] == "textures" else draw_shape
    root = os.path.abspath(root)
    if is_built(root, **params):
        return root
    check_demo_root(root)
    parent = os.path.dirname(root)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".ddf_demo_tmp_", dir=parent)
    except OSError as e:
        raise DemoRootError(f"--demo-root {root}: cannot write the demo dataset in {parent} "
                            f"({e.strerror or e}); give a writable folder") from None
    if verbose:
        print(f"Building demo dataset in {root} ({len(names)} {params['kind']} classes, {params['train_per_class']} "
              f"train / {params['val_per_class']} val images per class, {params['img_size']}px) ...", flush=True)
    try:
        _draw_all(tmp, params, names, draw)
        if os.path.isdir(root):  # empty, or an earlier demo build with other parameters (checked above)
            check_demo_root(root)
            old = tempfile.mkdtemp(prefix=".ddf_demo_old_", dir=parent)
            os.replace(root, os.path.join(old, "d"))
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
