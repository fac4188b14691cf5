"""The mutation campaign stays runnable: every mutant of tools/mutants.py still finds its text exactly once (a
refactor that moves the mutated code must re-target the mutant, or the campaign reports it as not applied)."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

from mutants import MUTANTS  # noqa: E402


def test_mutant_ids_are_unique():
    ids = [m["id"] for m in MUTANTS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: f"mutant{m['id']}")
def test_mutant_applies_once_and_changes_the_code(mutant):
    with open(os.path.join(REPO, mutant["file"]), encoding="utf-8") as f:
        text = f.read()
    assert text.count(mutant["old"]) == 1, f"mutant {mutant['id']} ({mutant['what']}): its text occurs " \
        f"{text.count(mutant['old'])} times in {mutant['file']}; re-target it at today's code"
    assert mutant["new"] != mutant["old"]
    for test_file in mutant["tests"]:
        assert os.path.isfile(os.path.join(REPO, test_file)), test_file
