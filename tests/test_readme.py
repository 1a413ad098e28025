"""The README's promises: its example of checking your own implementation runs and catches the
classic bug, and its conventions table is the records."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnref.conventions import CONVENTIONS

README = (Path(__file__).parent.parent / "README.md").read_text()


def fenced_block_after(marker: str) -> str:
    match = re.search(rf"<!-- {re.escape(marker)} -->\n```\w*\n(.*?)```", README, re.S)
    assert match, f"README has no code block after <!-- {marker} -->"
    return match.group(1)


def write_example(tmp_path: Path, my_bn: str | None = None) -> None:
    (tmp_path / "my_bn.py").write_text(my_bn or fenced_block_after("example:my-bn"))
    (tmp_path / "test_my_bn.py").write_text(fenced_block_after("example:own-implementation"))


def run_in(tmp_path: Path, command: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("BNREF_PROFILE",
                                                            "HYPOTHESIS_PROFILE")}
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600, check=False)


def run_pytest_on(tmp_path: Path) -> subprocess.CompletedProcess:
    return run_in(tmp_path, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "test_my_bn.py"])


def run_check_command(tmp_path: Path) -> subprocess.CompletedProcess:
    """The README's command, with this interpreter's bnref."""
    words = fenced_block_after("example:check-implementation").split()
    assert words[:2] == ["bnref", "check"]
    return run_in(tmp_path, [sys.executable, "-m", "bnref", *words[1:]])


def biased(source: str) -> str:
    """Feeding PyTorch's running variance the biased estimate: a textbook slip."""
    buggy = source.replace("momentum * v * n / (n - 1)", "momentum * v")
    assert buggy != source
    return buggy


def test_the_own_implementation_example_passes(tmp_path):
    write_example(tmp_path)
    result = run_pytest_on(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 passed" in result.stdout


def test_the_own_implementation_example_catches_a_biased_running_variance(tmp_path):
    write_example(tmp_path, biased(fenced_block_after("example:my-bn")))
    result = run_pytest_on(tmp_path)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "running_var" in result.stdout
    assert "its running variance is biased" in result.stdout
    assert "reproduce with:" in result.stdout


def test_the_check_command_passes_the_example_and_diagnoses_the_slip(tmp_path):
    write_example(tmp_path)
    result = run_check_command(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "diagnosis: backend 'my_bn:my_batch_norm' conforms to convention torch" in result.stdout
    write_example(tmp_path, biased(fenced_block_after("example:my-bn")))
    result = run_check_command(tmp_path)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "its running variance is biased" in result.stdout


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_readme_conventions_row_is_the_record(name):
    record = CONVENTIONS[name]
    row = next(line for line in README.splitlines() if line.startswith(f"| {name} |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    rule = "`(1-m)*old + m*batch`" if record.momentum_weights == "new" else (
        "`m*old + (1-m)*batch`")
    assert cells[2:7] == [rule, f"{record.default_momentum:g}", f"{record.default_eps:g}",
                          "unbiased" if record.unbiased_running_var else "biased",
                          str(record.default_axis)]
    names = [record.state_names[k] for k in ("gamma", "beta", "running_mean", "running_var")]
    assert cells[7] == ", ".join(names)


@pytest.mark.parametrize("marker", ["quickstart:check", "quickstart:test"])
def test_quickstart_commands_are_one_line_each(marker):
    """.ci/run executes these blocks verbatim, so each must stay a single command."""
    lines = [line for line in fenced_block_after(marker).splitlines() if line.strip()]
    assert len(lines) == 1
    assert "pip install -e '.[all,test]'" in lines[0]


def test_every_other_python_snippet_runs(tmp_path, monkeypatch):
    """The usage snippets (conventions, backends, convert) are executed as written, in a
    scratch directory (the convert snippet writes a file)."""
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S)
              if "test_my_bn" not in b]
    assert len(blocks) >= 3
    from bnref.testing.fixtures import backend_or_skip

    # the snippets' frameworks must be there (or skip)
    for backend, statement in (("torch", "import torch"), ("jax", "import jax"),
                               ("tf", "import tensorflow"), ("mxnet", "import bnref.mxnet")):
        if any(statement in b for b in blocks):
            backend_or_skip(backend)
    for number, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {number}", "exec"), {})
