"""The package's shape: the kernel module's import name, the package list, the two-command README, CI."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_kernels_folder_is_imported_as_oatui_kernels_only(tmp_path: Path) -> None:
    # A fresh interpreter outside the repository, as users and stage processes run.
    code = (
        "import importlib.util, json, oatui_kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps([oatui_kernels.__file__, spec.origin if spec else None]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    kernels_file, other = __import__("json").loads(out.strip().splitlines()[-1])
    assert Path(kernels_file).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    assert other is None or not Path(other).resolve().is_relative_to(REPO), other


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "oatui").rglob("__init__.py")}
    assert found | {"oatui_kernels"} == listed


def test_readme_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^```(?:sh|bash|console)?\n(.*?)```", quick, re.S | re.M)
    lines = [line for block in commands for line in block.strip().splitlines() if line.strip()]
    assert lines == ["make run", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_requirements_are_pinned() -> None:
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=\s]+", line.strip()), line
    lock = (REPO / "requirements.lock").read_text()
    assert "torch==2.13.0" in lock and re.search(r"^numpy==1\.", lock, re.M) and re.search(r"^datasets==4\.", lock, re.M)
