"""SVG snapshots of the main screen (pytest-textual-snapshot), at 120x40 and 80x24.

Deterministic: the GPU panel replays the 8-GPU recording and samples once (a refresh of an hour),
the runs are finished ones with fixed times, and the header shows a fixed workspace name.
Update with `pytest tests/test_app_snapshots.py --snapshot-update` after a deliberate change.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from oatui.app.app import make_app

from test_app import RECORDING, fake_run, sft_metrics


def _workspace(root: Path) -> Path:
    fake_run(root, "sft-20261124-093000-5e1f", created=1.0e9 + 200, metrics=sft_metrics(40),
             log="[oatui] sft run on 1 process (python launcher)\n{'loss': '2.31', 'epoch': '1.9'}\n"
                 "[oatui] final model: runs/sft-20261124-093000-5e1f/final\n[oatui] succeeded (exit status 0)\n")
    fake_run(root, "rm-20261124-101500-a2c4", stage="rm", state="failed", created=1.0e9 + 100,
             error="datasets: feedback.trees.jsonl:12: not JSON",
             metrics=[{"step": 6, "total_steps": 24, "time": 1.0e9 + 160, "rm/accuracy": 0.61}])
    broken = root / "runs" / "rl-20261124-110000-0bad"
    broken.mkdir(parents=True)
    (broken / "run.json").write_text("{")
    return root


def _app(workspace: Path) -> Any:
    return make_app(_workspace(workspace), replay=RECORDING, refresh=3600)


async def _settle(pilot: Any) -> None:
    app = pilot.app
    app.sub_title = "/srv/oatui/workspace"
    deadline = time.monotonic() + 10
    while (app.snapshot is None or app.run_list.row_count < 3 or app.run_log.line_count < 4) \
            and time.monotonic() < deadline:
        await pilot.pause(0.05)
    await pilot.pause(0.2)


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
def test_main_screen(snap_compare: Any, workspace: Path, size: tuple[int, int]) -> None:
    assert snap_compare(_app(workspace), terminal_size=size, run_before=_settle)
