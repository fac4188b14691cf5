"""README.md stays honest (issue 25 item 3): every ``python <script> ... --flag`` in its shell blocks names an option
that script's argparse accepts, written out in full (argparse would also take an abbreviation; the README should not
rely on that), and the cheap commands run as written.

Commands are read from the ```bash / ```sh / ```shell blocks (every line) and from any other non-Python block's
``$ ``-prompt lines; a trailing backslash joins lines, ``#`` starts a comment, ``&&``, ``;`` and ``|`` separate
commands, ``NAME=value`` prefixes are skipped, ``[--opt]`` counts as ``--opt``. Recognised: ``python SCRIPT``,
``torchrun [its options] SCRIPT`` and ``./distributed_train.sh NPROC`` (train.py, less the launcher's own
``--nnodes/--node-rank/--master-addr/--master-port``). ``python -m`` / ``-c`` lines are not checked. The options of
each script come from its own parser: the scripts are run up to their ``parse_args`` in one subprocess, where the
parser is read instead of parsing (a script without argparse is not run: it takes no options)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from typing import Dict, List, NamedTuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
LAUNCHER_FLAGS = {"--nnodes", "--node-rank", "--node_rank", "--master-addr", "--master_addr", "--master-port",
                  "--master_port"}  # distributed_train.sh's own (see its header)
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
NUMBER = re.compile(r"^-\d")


class Command(NamedTuple):
    line: int  # README line where the command starts
    script: str  # path relative to the repository root
    flags: List[str]
    text: str  # the whole command line, continuations joined


def shell_lines(text: str):
    """(line number, command line) of the shell commands in the markdown ``text``, continuations joined."""
    lang, pending, start = None, "", 0
    for no, raw in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*```\s*(\S*)", raw)
        if fence:
            lang = None if lang is not None else fence.group(1).lower()
            pending = ""
            continue
        if lang is None or lang == "python":
            continue
        line = raw.strip()
        if lang not in SHELL_BLOCKS:
            if not (pending or line.startswith("$ ")):
                continue
        if line.startswith("$ "):
            line = line[2:]
        if not pending:
            start = no
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def _segments(line: str):
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    segment = []
    for tok in lex:
        if tok in ("&&", "||", ";", "|", "&"):
            yield segment
            segment = []
        else:
            segment.append(tok)
    yield segment


def _flags(args: List[str]) -> List[str]:
    out = []
    for tok in args:
        tok = tok.strip("[]")
        if tok.startswith("-") and tok != "-" and not NUMBER.match(tok):
            out.append(tok.split("=", 1)[0])
    return out


def commands(text: str) -> List[Command]:
    """The ``python SCRIPT`` / ``torchrun ... SCRIPT`` / ``./distributed_train.sh`` commands of ``text``."""
    found = []
    for no, line in shell_lines(text):
        for seg in _segments(line):
            while seg and ENV_ASSIGNMENT.match(seg[0]):
                seg = seg[1:]
            if not seg:
                continue
            prog, rest = os.path.basename(seg[0]), seg[1:]
            if prog in ("python", "python3"):
                if not rest or rest[0].startswith("-"):  # python -m / -c: not a script of ours
                    continue
                found.append(Command(no, os.path.normpath(rest[0]), _flags(rest[1:]), line))
            elif prog == "torchrun":
                scripts = [i for i, tok in enumerate(rest) if tok.endswith(".py")]
                if scripts:
                    i = scripts[0]
                    found.append(Command(no, os.path.normpath(rest[i]), _flags(rest[i + 1:]), line))
            elif prog == "distributed_train.sh":
                flags = [f for f in _flags(rest[1:]) if f not in LAUNCHER_FLAGS]
                found.append(Command(no, "train.py", flags, line))
    return found


_GRAB = r"""
import argparse, json, os, runpy, sys

class Grabbed(Exception):
    pass

def grab(self, args=None, namespace=None):
    raise Grabbed(sorted(self._option_string_actions))

argparse.ArgumentParser.parse_known_args = grab  # parse_args goes through it
out = {}
for script in sys.argv[1:]:
    with open(script, encoding="utf-8") as f:
        if "argparse" not in f.read():  # no parser: never run it (it would do its work)
            out[script] = None
            continue
    sys.argv = [script]
    try:
        runpy.run_path(script, run_name="__main__")
        out[script] = "it ran to the end without parsing its arguments"
    except Grabbed as got:
        out[script] = got.args[0]
    except SystemExit as exc:
        out[script] = f"it exited ({exc.code}) before parsing its arguments"
print(json.dumps(out))
"""


def script_options(scripts) -> Dict[str, List[str]]:
    """The option strings each script's parser accepts (None: it has no argparse parser; a string: why they could
    not be read), read in one subprocess."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _GRAB, *sorted(scripts)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def readme_commands():
    with open(README, encoding="utf-8") as f:
        return commands(f.read())


def test_the_command_reader():
    text = "\n".join([
        "```bash",
        "pip install -e . && PYTHONPATH=. python tools/x.py --a 1 -b   # a comment --not-a-flag",
        "python train.py /data --model m \\",
        "    --lr=0.4 [--opt] --delta -1",
        "NNODES=2 ./distributed_train.sh 8 --nnodes 2 --master-port 29500 /data --config c.yaml",
        "torchrun --nproc_per_node 2 validate.py --checkpoint a",
        "python -m pytest -q tests",
        "```",
        "```python",
        "python train.py --not-shell",
        "```",
        "```",
        "$ python tables.py --json          # 1 s",
        "output --not-a-command",
        "```",
    ])
    got = [(c.line, c.script, c.flags) for c in commands(text)]
    assert got == [(2, "tools/x.py", ["--a", "-b"]), (3, "train.py", ["--model", "--lr", "--opt", "--delta"]),
                   (5, "train.py", ["--config"]), (6, "validate.py", ["--checkpoint"]), (13, "tables.py", ["--json"])]


def test_every_flag_in_the_readme_is_an_option_of_its_script(readme_commands):
    scripts = {c.script for c in readme_commands}
    assert {"train.py", "validate.py"} <= scripts, "README.md shows no train.py / validate.py command"
    missing = sorted(s for s in scripts if not os.path.isfile(os.path.join(REPO, s)))
    assert not missing, f"README.md runs scripts that do not exist: {missing}"
    options = script_options(scripts)
    bad = []
    for c in readme_commands:
        accepted = options[c.script]
        if isinstance(accepted, str):
            bad.append(f"README.md:{c.line}: {c.script}: its options could not be read: {accepted}")
            continue
        if accepted is None:
            if c.flags:
                bad.append(f"README.md:{c.line}: {c.script} takes no options")
            continue
        bad += [f"README.md:{c.line}: {c.script} has no option {f}" for f in c.flags if f not in accepted]
    assert not bad, "\n".join(bad)


CHEAP = {  # README commands that finish in seconds on a CPU, run as written (from the repository root)
    "python tools/mutation_campaign.py --list",
    'python -c "import ddf; print(ddf.backend_info())"',
}


def test_the_cheap_readme_commands_run(readme_commands):
    with open(README, encoding="utf-8") as f:
        lines = [ln.split("  #")[0].strip() for _, ln in shell_lines(f.read())]
    present = sorted(CHEAP.intersection(lines))
    assert present, f"none of the cheap commands {sorted(CHEAP)} is in README.md any more: update CHEAP"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for cmd in present:
        argv = shlex.split(cmd)
        argv[0] = sys.executable
        res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and res.stdout.strip(), f"{cmd}: exit {res.returncode}\n{res.stderr[-2000:]}"
