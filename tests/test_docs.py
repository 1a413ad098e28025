"""The conventions guide's claims each cite a test: every cited test must exist, and the
guide's table must agree with the convention records."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bnref.conventions import CONVENTIONS

ROOT = Path(__file__).parent.parent
GUIDE = (ROOT / "docs" / "conventions.md").read_text()
CITED = sorted(set(re.findall(r"`((?:tests|bnref)/[\w/]+\.py)::(test_\w+)`", GUIDE)))


def test_the_guide_cites_tests_and_the_readme_links_it():
    assert len(CITED) >= 15
    assert "docs/conventions.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(("path", "name"), CITED, ids=[f"{p}::{n}" for p, n in CITED])
def test_every_cited_test_exists(path, name):
    tree = ast.parse((ROOT / path).read_text())
    names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert name in names, f"{path} has no {name}"


def test_the_guide_table_is_the_records():
    order = ("torch", "keras", "flax", "mxnet", "onnx")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
            for line in GUIDE.splitlines() if line.startswith("| ")}
    momentum = [f"{CONVENTIONS[n].default_momentum:g}" for n in order]
    assert rows["default momentum"] == momentum
    assert rows["running var fed with"] == [
        "unbiased" if CONVENTIONS[n].unbiased_running_var else "biased" for n in order]
    assert rows["channel axis"] == [str(CONVENTIONS[n].default_axis) for n in order]
    eps = [CONVENTIONS[n].default_eps for n in order]
    assert [float(cell.split(" ")[0]) for cell in rows["default eps"]] == eps
