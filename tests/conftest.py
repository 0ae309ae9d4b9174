"""Shared fixtures: fresh workspaces, the `oatui` command, and one workspace with trained tiny models.

The trained workspace runs the real tiny SFT and RM stages once per test session (as
subprocesses, through `oatui train`); serving, RL, app and demo tests reuse its models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OATUI = str(Path(sys.executable).parent / "oatui")


def run_oatui(*args: str, workspace: Path | None = None, timeout: float = 600, check: bool = False,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `oatui` command; returns the completed process (text stdout/stderr)."""
    argv = [OATUI, *args]
    if workspace is not None:
        argv += ["--workspace", str(workspace)]
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env,
                            cwd=str(cwd) if cwd else None)
    if check and result.returncode != 0:
        raise AssertionError(f"oatui {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


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

    info = wait_for_end(RunDir(root / "runs" / run_id), timeout=600)
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


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
