"""Image decoding (issue 30 item 3): 16-bit / 32-bit / float, palette with transparency, alpha, CMYK and EXIF-rotated
images reach the model as the right 8-bit pixels, through the same dataset path as training; what cannot be
converted is a bad image under --bad-image."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

from training.data import UnreadableImageError, create_dataset, to_model_mode


def _dataset(tmp_path, images, bad_image="error", channels=3):
    """A one-class folder dataset holding ``images`` ({file name: PIL image or save kwargs tuple}); returns the
    dataset (no transform) and the file names in sample order."""
    cdir = tmp_path / "train" / "a"
    cdir.mkdir(parents=True)
    for name, img in images.items():
        img, kw = img if isinstance(img, tuple) else (img, {})
        img.save(str(cdir / name), **kw)
    ds = create_dataset(str(tmp_path), "train", bad_image=bad_image, substitute=False)
    ds.channels = channels
    return ds, [os.path.basename(p) for p, _ in ds.reader.samples]


def _pixels(img):
    return np.asarray(img).tolist()


def test_16bit_png_is_scaled_by_value_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535, 1000, 65278]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    ds, _ = _dataset(tmp_path, {"g16.png": img})
    out, _ = ds[0]
    assert out.mode == "RGB"
    # v / 257 rounded: 0, 1, 128, 255, 4 (1000/257 = 3.89), 254; the old convert("RGB") gave 0, 255, 255, 255, ...
    assert _pixels(out) == [[[v] * 3 for v in (0, 1, 128, 255, 4, 254)]]


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I"])
def test_other_wide_integer_modes(mode):
    values = [0, 300, 40000, 65535]
    if mode == "I":
        img = Image.fromarray(np.array([values], dtype=np.int32))
    else:
        dtype = ">u2" if mode.endswith("B") else "<u2"
        img = Image.frombytes(mode, (4, 1), np.array(values, dtype=dtype).tobytes())
    assert img.mode == mode
    out = to_model_mode(img)
    assert _pixels(out) == [[[v] * 3 for v in (0, 1, 156, 255)]]


def test_float_tiff_in_0_1_is_scaled(tmp_path):
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.1]], dtype=np.float32))
    ds, _ = _dataset(tmp_path, {"f.tiff": img})
    out, _ = ds[0]
    assert _pixels(out) == [[[v] * 3 for v in (0, 128, 255, 26)]]  # old: 0, 0, 1, 0


@pytest.mark.parametrize("array", [np.array([[0.0, 300.0]], np.float32), np.array([[0.0, np.nan]], np.float32),
                                   np.array([[-5, 70000]], np.int32)], ids=["float-range", "float-nan", "int32-range"])
def test_unconvertible_range_is_a_bad_image(tmp_path, array, caplog):
    ds, _ = _dataset(tmp_path, {"x.tiff": Image.fromarray(array)}, bad_image="error")
    with pytest.raises(UnreadableImageError, match=r"unreadable image .*x\.tiff.*ImageConversionError.*pixel"):
        ds[0]
    ds.bad_image = "skip"
    log = logging.getLogger("ddf.data")  # a train run earlier in the session may have stopped its propagation
    log.addHandler(caplog.handler)
    try:
        assert ds[0] is None  # evaluation: dropped and counted
    finally:
        log.removeHandler(caplog.handler)
    assert "skipping unreadable image" in caplog.text and "x.tiff" in caplog.text


def test_palette_with_transparency_composites_on_black(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([200, 100, 50, 10, 20, 30, 250, 250, 250] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    ds, _ = _dataset(tmp_path, {"p.png": (img, {"transparency": 0}), "q.png": img.copy()})
    got = {name: _pixels(ds[i][0]) for i, name in enumerate(_dataset_names(ds))}
    assert got["p.png"] == [[[0, 0, 0], [10, 20, 30], [250, 250, 250]]]  # index 0 transparent: black (old: 200,100,50)
    assert got["q.png"] == [[[200, 100, 50], [10, 20, 30], [250, 250, 250]]]  # no transparency: the palette colours


def _dataset_names(ds):
    return [os.path.basename(p) for p, _ in ds.reader.samples]


def test_alpha_is_composited_on_black(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (200, 100, 50, 255), (200, 100, 50, 128)])
    la = Image.new("LA", (2, 1))
    la.putdata([(200, 128), (90, 255)])
    ds, _ = _dataset(tmp_path, {"rgba.png": rgba, "la.png": la})
    got = {name: _pixels(ds[i][0]) for i, name in enumerate(_dataset_names(ds))}
    # a transparent pixel is black (the old convert dropped alpha: (255, 0, 0)); half alpha scales the colour
    assert got["rgba.png"] == [[[0, 0, 0], [200, 100, 50], [100, 50, 25]]]
    assert got["la.png"] == [[[100] * 3, [90] * 3]]


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (3, 1))
    img.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 128)])
    ds, _ = _dataset(tmp_path, {"c.tiff": img})
    assert _pixels(ds[0][0]) == [[[255, 255, 255], [0, 255, 255], [127, 127, 127]]]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (3, 2))
    img.putdata([(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 10, 10), (20, 20, 20), (30, 30, 30)])
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    ds, _ = _dataset(tmp_path, {"rot.png": (img, {"exif": exif})})
    out, _ = ds[0]
    assert out.size == (2, 3)  # old: (3, 2), the stored orientation
    assert _pixels(out) == _pixels(img.transpose(Image.Transpose.ROTATE_270))
    assert _pixels(out)[0] == [[10, 10, 10], [255, 0, 0]]


def test_one_channel_data_is_grayscale(tmp_path):
    rgb = Image.new("RGB", (2, 1))
    rgb.putdata([(255, 0, 0), (10, 200, 30)])
    g16 = Image.fromarray(np.array([[32896, 65535]], dtype=np.uint16))
    ds, _ = _dataset(tmp_path, {"a.png": rgb, "b.png": g16}, channels=1)
    got = {name: ds[i][0] for i, name in enumerate(_dataset_names(ds))}
    assert all(im.mode == "L" for im in got.values())
    assert _pixels(got["a.png"]) == [[76, 124]]  # ITU-R 601 luma: 0.299 R + 0.587 G + 0.114 B
    assert _pixels(got["b.png"]) == [[128, 255]]
