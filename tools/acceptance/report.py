"""gpu_acceptance.md / gpu_acceptance.json: the phases' statuses and tables, written atomically."""
from __future__ import annotations

import datetime
import os
from typing import Dict, List

from .common import write_json


def status_line(p: Dict) -> str:
    why = p.get("reason") or p.get("detail") or ""
    return f"{p['name']:12} {p['status']:8} {p.get('seconds', 0):7.1f} s  {why}"


def _md_table(t: Dict) -> str:
    lines = [f"**{t['title']}**", ""]
    if t["header"]:
        lines += ["| " + " | ".join(t["header"]) + " |", "|" + "|".join("---" for _ in t["header"]) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t["rows"]]
    if t.get("note"):
        lines += ["", t["note"]]
    return "\n".join(lines)


def _device(phases: List[Dict]) -> str:
    for p in phases:
        if p["name"] == "env" and p.get("info"):
            return str(p["info"].get("gpu", "unknown"))
    return "unknown"


def write(out: str, phases: List[Dict], started: datetime.datetime, dry_run: bool) -> str:
    """Write both files; return the summary table printed last."""
    finished = datetime.datetime.now(datetime.timezone.utc)
    meta = {"started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
            "dry_run": dry_run, "device": _device(phases),
            "seconds": round((finished - started).total_seconds(), 1)}
    write_json(os.path.join(out, "gpu_acceptance.json"), {**meta, "phases": phases})
    summary = "\n".join(["| phase | status | seconds | detail |", "|---|---|---:|---|"] +
                        [f"| {p['name']} | {p['status']} | {p.get('seconds', 0):.1f} | "
                         f"{(p.get('reason') or p.get('detail') or '').replace('|', '/')} |" for p in phases])
    kind = "dry run (CPU, tiny sizes: no GPU figure)" if dry_run else "GPU run"
    parts = [f"# GPU acceptance: {meta['device']}, {meta['started']}", "",
             f"{kind}; {meta['seconds']} s in all; command `PYTHONPATH=. python tools/gpu_acceptance.py"
             f"{' --dry-run' if dry_run else ''}`", "", summary]
    for p in phases:
        if p.get("tables"):
            parts += ["", f"## {p['name']}", ""] + [_md_table(t) + "\n" for t in p["tables"]]
    text = "\n".join(parts) + "\n"
    tmp = os.path.join(out, f".gpu_acceptance.md.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, "gpu_acceptance.md"))
    return summary
