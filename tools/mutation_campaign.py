"""Mutation campaign: do the tests catch small realistic bugs?

Each mutant is one textual edit of one source file (a wrong sign, an off-by-one, a swapped layout, a missing
check...). For every mutant the script copies the working tree (tracked and untracked-but-not-ignored files) into
a temporary folder, applies the edit, runs the named test files there (``pytest -x -q``) and counts the mutant as
*caught* when pytest fails. A mutant whose text is not found exactly once is reported as an error (the campaign
must be updated with the code), never silently counted.

    python tools/mutation_campaign.py                  # every mutant in tools/mutants.py
    python tools/mutation_campaign.py --only 3,7       # some of them
    python tools/mutation_campaign.py --list           # print the mutants

It prints one line per mutant and a summary ``caught N of M (P %)``; ``--json FILE`` writes the results. Exit code
0 when every mutant applied (whatever the score), 2 when a mutant could not be applied.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from mutants import MUTANTS  # noqa: E402


def _tree_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line and os.path.isfile(os.path.join(REPO, line))]


def _copy_tree(dst: str) -> None:
    for rel in _tree_files():
        target = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), target)


def _apply(root: str, mutant: dict) -> None:
    path = os.path.join(root, mutant["file"])
    with open(path, encoding="utf-8") as f:
        text = f.read()
    count = text.count(mutant["old"])
    if count != 1:
        raise ValueError(f"mutant {mutant['id']}: the text to replace occurs {count} times in {mutant['file']}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(mutant["old"], mutant["new"]))


def run_mutant(mutant: dict, timeout: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ddf_mutant_") as root:
        _copy_tree(root)
        _apply(root, mutant)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        if mutant["file"].startswith("ddf/csrc/"):  # a private build, so the shared JIT cache stays unmutated
            env["TORCH_EXTENSIONS_DIR"] = os.path.join(root, ".torch_extensions")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant["tests"]]
        start = time.perf_counter()
        try:
            res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
            caught, tail = res.returncode != 0, (res.stdout + res.stderr).strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            caught, tail = True, [f"timed out after {timeout} s (a hang counts as caught)"]
    return {"id": mutant["id"], "file": mutant["file"], "what": mutant["what"], "caught": caught,
            "seconds": round(time.perf_counter() - start, 1), "last_line": tail[0] if tail else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant (default 900)")
    ap.add_argument("--json", default="", help="write the results to this file")
    args = ap.parse_args(argv)
    chosen = MUTANTS
    if args.only:
        wanted = {int(x) for x in args.only.split(",")}
        chosen = [m for m in MUTANTS if m["id"] in wanted]
    if args.list:
        for m in chosen:
            print(f"{m['id']:3d} {m['file']}: {m['what']}")
        return 0
    results, errors = [], 0
    for m in chosen:
        try:
            r = run_mutant(m, args.timeout)
        except ValueError as exc:
            print(f"{m['id']:3d} ERROR {exc}", flush=True)
            errors += 1
            continue
        results.append(r)
        print(f"{r['id']:3d} {'caught  ' if r['caught'] else 'SURVIVED'} {r['seconds']:6.1f}s "
              f"{r['file']}: {r['what']}", flush=True)
    caught = sum(r["caught"] for r in results)
    n = len(results)
    print(f"caught {caught} of {n} ({100.0 * caught / max(n, 1):.0f} %)" + (f"; {errors} not applied" if errors else ""))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"caught": caught, "total": n, "errors": errors, "results": results}, f, indent=1)
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
