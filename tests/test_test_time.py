"""Tests of the latency benchmark (test_time.py) and of the PAC baseline (benchmarks/pac.py)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.pac import PacConv2dBaseline, pac_conv2d, pac_conv2d_naive  # noqa: E402


@pytest.mark.parametrize("dilation,stride,separate_guidance", [(1, 1, False), (2, 1, True), (1, 2, False)])
def test_pac_matches_naive_loop(dilation, stride, separate_guidance):
    g = torch.Generator().manual_seed(0)
    B, C, Co, H, W, k = 2, 3, 4, 6, 7, 3
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    # scaled guidance so the Gaussian kernel takes values spread over (0, 1], not all ~0
    guide = 0.4 * torch.randn(B, 2, H, W, generator=g, dtype=torch.float64) if separate_guidance else None
    if guide is None:
        x = 0.4 * x
    w = torch.randn(Co, C, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(Co, generator=g, dtype=torch.float64)
    fast = pac_conv2d(x, w, b, guide, dilation=dilation, stride=stride)
    slow = pac_conv2d_naive(x, w, b, guide, dilation=dilation, stride=stride)
    assert fast.shape == slow.shape == (B, Co, (H - 1) // stride + 1, (W - 1) // stride + 1)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    # the adapting kernel matters: the result differs from a plain convolution
    plain = torch.nn.functional.conv2d(x, w, b, stride=stride, padding=dilation, dilation=dilation)
    assert (fast - plain).abs().max() > 1e-3


def test_pac_module_float32_and_grad():
    torch.manual_seed(0)
    m = PacConv2dBaseline(4, 5, 3)
    x = (0.3 * torch.randn(1, 4, 5, 6)).requires_grad_()
    y = m(x)
    ref = pac_conv2d_naive(x.detach().double(), m.weight.detach().double(), m.bias.detach().double())
    torch.testing.assert_close(y.detach().double(), ref, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pac_bad_args():
    x = torch.randn(1, 4, 5, 6)
    with pytest.raises(ValueError, match="weight"):
        pac_conv2d(x, torch.randn(3, 2, 3, 3))
    with pytest.raises(ValueError, match="guidance"):
        pac_conv2d(x, torch.randn(3, 4, 3, 3), guidance=torch.randn(1, 2, 4, 6))
    with pytest.raises(ValueError, match="kernel_size"):
        PacConv2dBaseline(4, 4, 2)


# ----------------------------------------------------------------------------------------------
# CPU smoke run of test_time.py (tiny sizes, through its CLI entry point main(argv))
# ----------------------------------------------------------------------------------------------
import csv  # noqa: E402
import json  # noqa: E402

import test_time  # noqa: E402

TINY = ["--device", "cpu", "--batch", "1", "--channels", "8", "--resolutions", "7,9",
        "--table2-shape", "1,8,10,12", "--warmup", "1", "--min-repeats", "3", "--min-time", "0",
        "--sample-ms", "1", "--copy-mib", "4", "--rounds", "2", "--threads", "1", "--quiet"]


def test_cli_smoke_cpu_every_row_and_column(tmp_path, capsys):
    csv_path, json_path, md_dir = tmp_path / "r.csv", tmp_path / "r.json", tmp_path / "results"
    out = test_time.main(TINY + ["--mode", "both", "--csv", str(csv_path), "--json", str(json_path),
                                 "--save-results", str(md_dir)])
    printed = capsys.readouterr().out
    records = out["records"]
    # every (table, entry, size, mode) measured, all ok with positive finite numbers
    expected = {("A", e, f"1x8x{r}x{r}", m) for e in test_time.ENTRIES_A for r in (7, 9) for m in test_time.MODES}
    expected |= {("2", e, "1x8x10x12", m) for e in test_time.ENTRIES_2 for m in test_time.MODES}
    expected |= {("F", e, f"1x8x{r}x{r}", m) for e in test_time.ENTRIES_F for r in (7, 9) for m in test_time.MODES}
    got = {(r["table"], r["entry"], r["shape"], r["mode"]) for r in records}
    assert got == expected and len(records) == len(expected)
    for r in records:
        assert r["status"] == "ok", r
        assert 0 < r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] and r["iqr_ms"] >= 0
        assert r["repeats"] >= 6 and r["inner"] >= 1  # 2 rounds x >= 3 samples, pooled
        assert r["peak_mem_mib"] is None  # CPU: memory is not measured, never invented
        if r["entry"] in ("ddf_op", "dwconv"):
            assert r["min_bytes"] > 0 and r["achieved_gbps"] > 0
    assert out["meta"]["copy_bandwidth"]["gbps"] > 0
    # paper numbers sit beside ours for the forward rows that the paper has
    a7 = [r for r in records if r["table"] == "A" and r["shape"] == "1x8x7x7" and r["mode"] == "fwd"]
    assert {r["entry"]: r["paper_ms"] for r in a7} == {e: test_time.PAPER_TABLE_A[7][e] for e in test_time.ENTRIES_A}
    pac2 = [r for r in records if r["table"] == "2" and r["entry"] == "pac" and r["mode"] == "fwd"][0]
    assert (pac2["paper_ms"], pac2["paper_mem"]) == test_time.PAPER_TABLE_2["pac"]
    # the markdown report: every table, header and row
    for mode in test_time.MODES:
        assert f"## Table A — {mode}, B=1, C=8" in printed
        assert f"## Table 2 — {mode}, input 1×8×10×12" in printed
        assert f"## Table F — fused spatial FilterNorm, {mode}, B=1, C=8" in printed
    for header in ("| Resolution | Conv paper | Conv ours | DwConv paper | DwConv ours | DDF paper | DDF module ours "
                   "| DDF Op paper | DDF op ours |",
                   "| Resolution | DDF/Conv paper | ours | DDF/DwConv paper | ours | Op/Conv paper | ours "
                   "| Op/DwConv paper | ours | Op GB/s | Op % of copy BW | DwConv GB/s |",
                   "| Filter | Latency paper (ms) | Latency ours (ms) |"):
        assert printed.count(header) == 2
    for row in ("| 7×7 | 0.21 |", "| 9×9 | — |", "| PAC (our unfold baseline) | 46.40 |", "| DDF op (filters given) |"):
        assert row in printed
    assert printed.count("| Resolution | DDF module fused | DDF module unfused | fused/unfused |") == 2
    assert all(r["paper_ms"] is None for r in records if r["table"] == "F")
    assert "error" not in printed.lower()
    assert "Memory is **not measured** on CPU" in printed
    # files
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and all(float(r["median_ms"]) > 0 for r in rows)
    data = json.loads(json_path.read_text())
    assert data["meta"]["torch"] == torch.__version__ and len(data["records"]) == len(records)
    saved = sorted(p.name for p in md_dir.iterdir() if not p.name.endswith(".png"))  # png: only with matplotlib
    assert len(saved) == 2 and saved[0].endswith(".json") and saved[1].endswith(".md")
    assert sorted(out["saved"]) == sorted(str(p) for p in md_dir.iterdir())
    assert all("_cpu_" in n and "float32_contiguous" in n for n in saved)
    md = (md_dir / saved[1]).read_text()
    assert "CPU run" in md and "torch " + torch.__version__ in md


def test_cli_channels_last_bfloat16_forward(capsys):
    out = test_time.main(TINY + ["--tables", "A", "--resolutions", "7", "--dtype", "bfloat16",
                                 "--memory-format", "channels_last"])
    recs = out["records"]
    assert {r["entry"] for r in recs} == set(test_time.ENTRIES_A)
    assert all(r["status"] == "ok" and r["median_ms"] > 0 and r["dtype"] == "bfloat16" for r in recs), recs
    # bfloat16 moves half the bytes of float32
    op = [r for r in recs if r["entry"] == "ddf_op"][0]
    assert op["min_bytes"] == 2 * (2 * 8 * 49 + 8 * 9 + 9 * 49)


def test_cli_plot_is_skipped_or_written(tmp_path, capsys):
    png = tmp_path / "a.png"
    out = test_time.main(TINY + ["--tables", "A", "--resolutions", "7", "--plot", str(png)])
    try:
        import matplotlib  # noqa: F401
        assert out["plot"] is True and png.stat().st_size > 0
    except ImportError:
        assert out["plot"] is False and not png.exists()
        assert "matplotlib is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("bad,match", [
    (["--table2-shape", "1,8,10"], "B,C,H,W"),
    (["--resolutions", "7,a"], "integers"),
    (["--tables", "B"], "--tables"),
    (["--kernel-size", "4"], "--kernel-size"),
    (["--device", "tpu"], "--device"),
    (["--batch", "0"], "--batch"),
])
def test_cli_bad_arguments(bad, match, capsys):
    with pytest.raises(SystemExit):
        test_time.main(TINY + bad)
    assert match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_cli_cuda_absent_message(capsys):
    with pytest.raises(SystemExit):
        test_time.main(TINY + ["--device", "cuda"])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_min_bytes_formula():
    # DDF op forward: input + channel filter + spatial filter + output, float32
    assert test_time.min_bytes("ddf_op", (2, 4, 5, 6), 3, 4, "fwd") == 4 * (240 * 2 + 2 * 4 * 9 + 2 * 9 * 30)
    assert test_time.min_bytes("conv", (2, 4, 5, 6), 3, 4, "fwd") is None


def test_report_memory_columns_for_a_cuda_run(capsys):
    """The CUDA-only report parts (memory columns and ratios) rendered from real CPU timings with
    memory values filled in by the test itself (no GPU here); checks formatting only."""
    import argparse

    out = test_time.main(TINY + ["--tables", "2", "--mode", "fwd"])
    meta = dict(out["meta"], device="cuda:0", device_name="test GPU", tf32=False, cudnn_benchmark=True,
                ddf_backend="compiled (ddf._C, cpu kernels)")
    records = [dict(r) for r in out["records"]]
    for i, r in enumerate(records):
        r["peak_mem_mib"], r["peak_above_inputs_mib"] = 100.0 * (i + 1), 10.0 * (i + 1)
    report = test_time.format_report(meta, records, argparse.Namespace(modes=["fwd"], tables=["2"]))
    assert "GPU run" in report and "n/a" not in report
    assert "| Conv | 7.50 | " in report and "| 356.3 | 100.0 | 10.0 | 1.00 | 1.00 |" in report
    assert "| 3406.4 | 300.0 | 30.0 | 9.56 | 3.00 |" in report  # PAC row: paper and our memory ratio to Conv
    # a CUDA run whose DDF build has no CUDA kernels ran the reference: the report must say so
    assert "*reference* implementation" in report


def test_unfused_entry_switches_the_fusion_off_only_inside_its_call(monkeypatch):
    """Table F's unfused entry runs DDFPack with ddf.modules._FUSE_SPATIAL_NORM False and restores it."""
    import ddf.modules

    seen = []
    real = ddf.modules.SpatialBranch.filter_and_gain
    monkeypatch.setattr(ddf.modules.SpatialBranch, "filter_and_gain",
                        lambda *a: (seen.append(ddf.modules._FUSE_SPATIAL_NORM), real(*a))[1])
    for name, fused in (("ddf", True), ("ddf_unfused", False)):
        seen.clear()
        step, _ = test_time.make_entry(name, (1, 8, 7, 7), 3, torch.float32, torch.device("cpu"), False, "fwd+bwd")
        step()
        assert seen and all(v is fused for v in seen) and ddf.modules._FUSE_SPATIAL_NORM is True
