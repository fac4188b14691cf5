"""tables.py and the DDF FLOP formula (ddf/flops.py)."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import ddf
from ddf import flops


@pytest.fixture(scope="module")
def tables():
    saved = os.environ.get("DDF_BACKEND")
    try:
        yield importlib.import_module("tables")
    finally:  # importing tables.py sets DDF_BACKEND for its own process
        if saved is None:
            os.environ.pop("DDF_BACKEND", None)
        else:
            os.environ["DDF_BACKEND"] = saved


def test_formula_registered_once():
    assert flops.register_ddf_flop_formula(strict=True)
    assert flops.register_ddf_flop_formula(strict=True)  # second call: no duplicate-registration error
    from torch.utils import flop_counter

    assert torch.ops.ddf.ddf_forward in flop_counter.flop_registry


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("stride,head", [(1, 1), (2, 2)])
def test_ddf_op_counted_3nck2(device, stride, head):
    flops.register_ddf_flop_formula(strict=True)
    b, c, h, w, k = 2, 8, 9, 7, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, w, generator=g).to(device)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    ch = torch.randn(b, c, k, k, generator=g).to(device)
    sp = torch.randn(b, head * k * k, ho, wo, generator=g).to(device)
    counter = FlopCounterMode(display=False)
    with counter:
        torch.ops.ddf.ddf_forward(x, ch, sp, k, 1, stride, head, 0)
    assert counter.get_total_flops() == 3 * b * ho * wo * c * k * k


def test_ddfpack_split_into_paper_convention(monkeypatch):
    """One DDFPack: conv multiply-adds (2 FLOPs each in FlopCounterMode) are halved, DDF FLOPs kept."""
    monkeypatch.setenv("DDF_BACKEND", "auto")
    with torch.device("meta"):
        m = ddf.DDFPack(16, stride=2, se_ratio=0.25)
        x = torch.randn(1, 16, 10, 10)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        m(x)
    split = flops.paper_flops(counter.get_flop_counts()["Global"])
    n = 5 * 5
    spatial_macs = n * 16 * 9
    channel_macs = 16 * 4 + 4 * 16 * 9
    assert split["ddf"] == 3 * n * 16 * 9
    assert split["conv_linear_macs"] == spatial_macs + channel_macs
    assert split["total"] == split["ddf"] + split["conv_linear_macs"]


def test_count_refuses_zero_ddf_flops(tables, monkeypatch):
    # a DDF model whose DDF ops bypass the custom op must not be reported with DDF FLOPs = 0
    import ddf.modules
    from ddf.reference import ddf_reference

    monkeypatch.setattr(ddf.modules, "ddf", ddf_reference)
    with pytest.raises(RuntimeError, match="saw no torch.ops.ddf.ddf_forward call"):
        tables.count("ddf_mul_resnet_tiny", {}, img_size=64)


def test_count_r50_targets(tables):
    c = tables.count("ddf_mul_resnet50", {})
    assert c["ddf_layers"] == 16
    assert abs(c["params"] / 1e6 - 16.8) / 16.8 < 0.01
    assert abs(c["flops"] / 1e9 - 2.298) / 2.298 < 0.01
    base = tables.count("resnet50", {})
    assert base["ddf_flops"] == 0 and abs(base["flops"] / 1e9 - 4.1) / 4.1 < 0.01


def test_cli_json_subset():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tables.py"), "--json", "--tables", "3",
                          "--filter", "sigma=0.[34]"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["label"] for r in rows] == ["sigma=0.3", "sigma=0.4"]
    for r in rows:
        assert r["model"] == "ddf_mul_resnet50" and r["available"]
        assert abs(r["params_diff_pct"]) < 1.0 and abs(r["gflops_diff_pct"]) < 1.0
        assert r["ddf_gflops"] > 0 and r["conv_linear_gmacs"] > 0
    assert rows[0]["kwargs"] == {"se_ratio": 0.3} and rows[0]["paper_params_M"] == 18.1


def test_cli_text_table_r18():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tables.py"), "--tables", "4", "--filter", "R18"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Table 4" in out.stdout and "ddf_mul_resnet18" in out.stdout and "7.7" in out.stdout
    assert "ddf_mul_resnet50" not in out.stdout
