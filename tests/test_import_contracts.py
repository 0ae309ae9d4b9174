"""DESIGN.md's import boundaries as import-linter contracts (``.importlinter``), run with the suite.

The first test checks the tree as it is; the others break each contract in a copy of the tree, so a
contract that stopped matching anything (a renamed package, a typo) fails here too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / ".importlinter"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the packages found first under ``root`` (its ``oatui`` and ``oatui_kernels``)."""
    env = {**os.environ, "PYTHONPATH": str(root), "NO_COLOR": "1"}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(CONFIG), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold() -> None:
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


#: A line that breaks each contract, and the module it goes into.
BREACHES = {
    "Only oatui.app imports textual": [("oatui/data/trees.py", "import textual")],
    "The layers below the UI never import it, nor the commands that start it": [
        ("oatui/monitor/nvml.py", "from oatui.app import app"),
        ("oatui/serve/repository.py", "import oatui.commands.app"),
    ],
    "The app never imports the training stack itself": [("oatui/app/choices.py", "def later():\n    import torch")],
    "train/ never imports the launcher": [("oatui/train/common.py", "from oatui.stages import launcher")],
}


def test_every_contract_is_broken_below() -> None:
    assert sorted(re.findall(r"^name = (.+)$", CONFIG.read_text(encoding="utf-8"), re.M)) == sorted(BREACHES)


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [(module, line, contract) for contract, breaches in BREACHES.items() for module, line in breaches],
)
def test_each_contract_catches_a_breach(tmp_path: Path, module: str, line: str, contract: str) -> None:
    shutil.copytree(REPO / "oatui", tmp_path / "oatui", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "kernels", tmp_path / "oatui_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n\n{line}\n", encoding="utf-8")
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{contract} BROKEN" in result.stdout
    assert "1 broken" in result.stdout
