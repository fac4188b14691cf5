#!/usr/bin/env python
"""Print the parameter and FLOP columns of the paper's Tables 3, 4 and 5 beside ours.

    python tables.py                 # all three tables
    python tables.py --tables 3      # only Table 3
    python tables.py --json          # machine-readable rows
    python tables.py --filter r18    # rows whose label or model contains 'r18' (case-insensitive)

FLOPs are counted the way the paper counts them (Sec. 4.1): multiply-adds of the conv/linear layers
plus ``3 * n * c * k**2`` per DDF op (n = output pixels), for one 224x224 image. Counting uses
``torch.utils.flop_counter.FlopCounterMode`` with the formula that ``ddf/flops.py`` registers for
``torch.ops.ddf.ddf_forward``; models are built on the meta device (no memory, no compute), so the
whole script takes seconds. ``ddf()`` always calls the custom op (whatever backend runs it); if a model's DDF
layers bypass it, the script stops with an error instead of counting DDF layers as 0.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Dict, List, Optional

import torch  # noqa: E402
import timm  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import ddf  # noqa: E402
import models  # noqa: E402,F401  (registers the DDF-ResNets)
from ddf import flops as ddf_flops  # noqa: E402

M = 1e6
B = 1e9

# (table, section, label, model, kwargs, paper params [M], paper FLOPs [G], paper top-1)
ROWS: List[tuple] = [
    # Table 3: DDF-ResNet50 ablations
    ("3", "(a) filters", "Base model (ResNet50)", "resnet50", {}, 25.6, 4.1, "77.2"),
    ("3", "(a) filters", "spatial only", "ddf_mul_resnet50", {"filters": "spatial"}, None, None, "74.4"),
    ("3", "(a) filters", "channel only", "ddf_mul_resnet50", {"filters": "channel"}, None, None, "78.7"),
    ("3", "(a) filters", "spatial + channel (DDF)", "ddf_mul_resnet50", {}, 16.8, 2.298, "79.1"),
    ("3", "(b) normalisation", "Batch-Norm", "ddf_mul_resnet50", {"normalization": "batch_norm"}, None, None,
     "76.0"),
    ("3", "(b) normalisation", "Sigmoid", "ddf_mul_resnet50", {"normalization": "sigmoid"}, None, None, "78.2"),
    ("3", "(b) normalisation", "Filter-Norm", "ddf_mul_resnet50", {}, 16.8, 2.298, "79.1"),
    ("3", "(c) squeeze ratio", "sigma=0.2", "ddf_mul_resnet50", {"se_ratio": 0.2}, 16.8, 2.298, "79.1"),
    ("3", "(c) squeeze ratio", "sigma=0.3", "ddf_mul_resnet50", {"se_ratio": 0.3}, 18.1, 2.299, "79.0"),
    ("3", "(c) squeeze ratio", "sigma=0.4", "ddf_mul_resnet50", {"se_ratio": 0.4}, 19.4, 2.300, "79.2"),
    # Table 4: other dynamic filters (only the rows that can be built here)
    ("4", "R18", "Base model (ResNet18)", "resnet18", {}, 11.7, 1.8, "69.6"),
    ("4", "R18", "DDF (mul)", "ddf_mul_resnet18", {}, 7.7, 0.4, "70.6"),
    ("4", "R18", "DDF (add)", "ddf_add_resnet18", {}, None, None, "-"),
    ("4", "R50", "Base model (ResNet50)", "resnet50", {}, 25.6, 4.1, "77.2"),
    ("4", "R50", "DDF (mul)", "ddf_mul_resnet50", {}, 16.8, 2.3, "79.1"),
    ("4", "R50", "DDF (add)", "ddf_add_resnet50", {}, None, None, "-"),
    # Table 5: ResNet variants (timm's builds of the compared architectures where timm has them)
    ("5", "R50", "ResNet50 (base)", "resnet50", {}, 25.6, 4.1, "76.0 (77.2)"),
    ("5", "R50", "SE-ResNet50", "seresnet50", {}, 28.1, 4.1, "77.6 (77.8)"),
    ("5", "R50", "ResNeXt50 (32x4d)", "resnext50_32x4d", {}, 25.0, 4.3, "77.8 (78.2)"),
    ("5", "R50", "Res2Net50 (14w-8s)", "res2net50_14w_8s", {}, 25.7, 4.2, "78.0"),
    ("5", "R50", "DDF-ResNet50 (mul)", "ddf_mul_resnet50", {}, 16.8, 2.3, "79.1"),
    ("5", "R50", "DDF-ResNet50 (add)", "ddf_add_resnet50", {}, None, None, "-"),
    ("5", "R101", "ResNet101 (base)", "resnet101", {}, 44.5, 7.8, "77.6 (78.9)"),
    ("5", "R101", "SE-ResNet101", "seresnet101", {}, 49.3, 7.8, "78.3 (79.3)"),
    ("5", "R101", "ResNeXt101 (32x4d)", "resnext101_32x4d", {}, 44.2, 8.0, "78.8 (79.5)"),
    ("5", "R101", "Res2Net101 (26w-4s)", "res2net101_26w_4s", {}, 45.2, 8.1, "79.2"),
    ("5", "R101", "DDF-ResNet101 (mul)", "ddf_mul_resnet101", {}, 28.1, 4.1, "80.2"),
    ("5", "R101", "DDF-ResNet101 (add)", "ddf_add_resnet101", {}, None, None, "-"),
]

TITLES = {
    "3": "Table 3. Ablations of DDF-ResNet50 (ImageNet)",
    "4": "Table 4. DDF vs. base models (rows of other dynamic filters are not built here)",
    "5": "Table 5. ResNet variants (BAM, CBAM, AA are not in timm and not built here)",
}

NOTES = {
    "4": ("DDF-R18: a DDF keeps the channel count, so conv1 of the three downsampling blocks (C -> 2C) stays a "
          "standard 3x3 conv and every other 3x3 conv is a DDF (README.md, section 'DDF modules and DDF-ResNets'). The paper's 0.4B FLOPs matches "
          "this choice; its 7.7M params does not (see README.md, section 'DDF modules and DDF-ResNets' for the analysis)."),
}


def count(model_name: str, kwargs: Dict[str, Any], img_size: int = 224, device: str = "meta") -> Dict[str, Any]:
    """Params and paper-convention FLOPs of one model for a (1, 3, img_size, img_size) input."""
    with torch.device(device):
        model = timm.create_model(model_name, **kwargs)
    model.eval()
    n_ddf = sum(isinstance(m, ddf.DDFPack) for m in model.modules())
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    split = ddf_flops.paper_flops(counter.get_flop_counts().get("Global", {}))
    if n_ddf and split["ddf"] == 0:
        raise RuntimeError(
            f"{model_name}: the model has {n_ddf} DDF layers but FlopCounterMode saw no "
            "torch.ops.ddf.ddf_forward call (ddf() did not dispatch to the compiled op); refusing to report "
            "FLOPs that leave the DDF ops out. Check `python -c 'import ddf; print(ddf.backend_info())'`.")
    return {"params": params, "flops": split["total"], "conv_linear_macs": split["conv_linear_macs"],
            "ddf_flops": split["ddf"], "ddf_layers": n_ddf}


def _diff(ours: float, paper: Optional[float]) -> Optional[float]:
    if paper is None:
        return None
    return 100.0 * (ours - paper) / paper


def build_rows(tables=("3", "4", "5"), pattern: Optional[str] = None, img_size: int = 224,
               device: str = "meta") -> List[Dict[str, Any]]:
    regex = re.compile(pattern, re.IGNORECASE) if pattern else None
    cache: Dict[str, Dict[str, Any]] = {}
    out = []
    for table, section, label, name, kwargs, p_params, p_flops, top1 in ROWS:
        if table not in tables:
            continue
        if regex and not (regex.search(label) or regex.search(name) or regex.search(section)):
            continue
        if not timm.is_model(name):
            out.append({"table": table, "section": section, "label": label, "model": name, "kwargs": kwargs,
                        "available": False, "paper_params_M": p_params, "paper_gflops": p_flops,
                        "paper_top1": top1})
            continue
        key = name + json.dumps(kwargs, sort_keys=True)
        if key not in cache:
            cache[key] = count(name, kwargs, img_size, device)
        c = cache[key]
        params_m = c["params"] / M
        gflops = c["flops"] / B
        out.append({
            "table": table, "section": section, "label": label, "model": name, "kwargs": kwargs,
            "available": True, "params": c["params"], "params_M": round(params_m, 3),
            "paper_params_M": p_params,
            "params_diff_pct": None if p_params is None else round(_diff(params_m, p_params), 2),
            "gflops": round(gflops, 4), "paper_gflops": p_flops,
            "gflops_diff_pct": None if p_flops is None else round(_diff(gflops, p_flops), 2),
            "conv_linear_gmacs": round(c["conv_linear_macs"] / B, 4), "ddf_gflops": round(c["ddf_flops"] / B, 4),
            "ddf_layers": c["ddf_layers"], "paper_top1": top1, "img_size": img_size,
        })
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_tables(rows: List[Dict[str, Any]]) -> None:
    header = (f"{'row':<28} {'model (kwargs)':<44} {'params':>8} {'paper':>6} {'diff%':>7} "
              f"{'GFLOPs':>7} {'paper':>6} {'diff%':>7}  {'paper top-1':<11}")
    for table in ("3", "4", "5"):
        trows = [r for r in rows if r["table"] == table]
        if not trows:
            continue
        print(f"\n{TITLES[table]}\n{header}\n{'-' * len(header)}")
        section = None
        for r in trows:
            if r["section"] != section:
                section = r["section"]
                print(f"  {section}")
            kw = ",".join(f"{k}={v}" for k, v in r["kwargs"].items())
            model = r["model"] + (f"({kw})" if kw else "")
            if not r["available"]:
                print(f"  {r['label']:<26} {model:<44} {'not available in this timm':>41}")
                continue
            print(f"  {r['label']:<26} {model:<44} {r['params_M']:>7.2f}M {_fmt(r['paper_params_M'], '.1f'):>6} "
                  f"{_fmt(r['params_diff_pct'], '+.2f'):>7} {r['gflops']:>7.3f} {_fmt(r['paper_gflops'], '.3f'):>6} "
                  f"{_fmt(r['gflops_diff_pct'], '+.2f'):>7}  {r['paper_top1']:<11}")
        if table in NOTES:
            print(f"  Note: {NOTES[table]}")
    print("\nparams: our count (paper, M); GFLOPs = conv/linear multiply-adds + 3*n*c*k^2 per DDF op, one "
          f"{rows[0]['img_size'] if rows and rows[0].get('available') else 224}px image; diff% = (ours - paper) / paper.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", default=["3", "4", "5"], choices=["3", "4", "5"],
                        help="which tables to print (default: all)")
    parser.add_argument("--filter", default=None, help="regex: keep rows whose label, section or model matches")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution (default 224, as the paper)")
    parser.add_argument("--device", default="meta",
                        help="device to build and count on (default meta: no memory, no compute)")
    args = parser.parse_args(argv)
    try:
        ddf_flops.register_ddf_flop_formula(strict=True)
    except ddf_flops.DDFOpUnavailable as e:
        print(f"tables.py: error: {e}", file=sys.stderr)
        return 2
    rows = build_rows(tuple(args.tables), args.filter, args.img_size, args.device)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_tables(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
