"""Shared fixtures: fresh workspaces, the `oatui` command, and one workspace with trained tiny models.

The trained workspace runs the real tiny SFT and RM stages once per test session (as
subprocesses, through `oatui train`); serving, RL, app and demo tests reuse its models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import run_oatui


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir(mode=0o700)
    return path


@dataclass(frozen=True)
class TrainedWorkspace:
    root: Path
    sft_run: str
    rm_run: str

    @property
    def sft_model(self) -> Path:
        return self.root / "runs" / self.sft_run / "final"

    @property
    def rm_model(self) -> Path:
        return self.root / "runs" / self.rm_run / "final"

    @property
    def tiny_base(self) -> Path:
        return self.root / "models" / "tiny-pythia"


def _train(stage: str, sections: list[str], root: Path) -> str:
    result = run_oatui("train", stage, "--configs", *sections, "--detach", workspace=root, check=True)
    run_id = result.stdout.strip().splitlines()[-1]
    from oatui.stages.runs import wait_for_end
    from oatui.stages.rundir import RunDir

    info = wait_for_end(RunDir(root / "runs" / run_id), timeout=1500)
    if info.state != "succeeded":
        log = (root / "runs" / run_id / "stdout.log").read_text(errors="replace")[-4000:]
        raise AssertionError(f"tiny {stage} run {run_id} ended {info.state}: {info.error}\n{log}")
    return run_id


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedWorkspace:
    """A workspace where the tiny SFT and RM stages have run to the end (about a minute, once)."""
    root = tmp_path_factory.mktemp("trained") / "ws"
    root.mkdir(mode=0o700)
    sft = _train("sft", ["defaults", "tiny"], root)
    rm = _train("rm", ["defaults_rm", "tiny_rm"], root)
    return TrainedWorkspace(root, sft, rm)
