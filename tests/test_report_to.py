"""``report_to``: each stage's metrics as TensorBoard event files in ``RUN/tensorboard/``, read back.

One workspace runs a few steps of each stage with ``report_to: tensorboard`` (SFT, then RM from it,
then RL from both), and each test reads one run's event files with TensorBoard's own reader.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import read_metrics, run_oatui

pytestmark = pytest.mark.slow

REPORT = ["--set", "report_to=tensorboard", "--set", "logging_steps=1"]
# The RL run as small as it can be while still judging the policy (before step 1 and at the end).
SMALL_RL = ["--set", "total_steps=2", "--set", "rollout_batch_size=4", "--set", "mini_batch_size=2",
            "--set", "ppo_epochs=1", "--set", "max_new_tokens=8", "--set", "eval_prompts=4"]


@dataclass(frozen=True)
class ReportedRuns:
    sft: Path
    rm: Path
    rl: Path


def _run(root: Path, stage: str, *args: str) -> Path:
    run_oatui("train", stage, *args, *REPORT, workspace=root, check=True)
    (run,) = [p for p in (root / "runs").iterdir() if p.name.startswith(f"{stage}-")]
    return run


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> ReportedRuns:
    root = tmp_path_factory.mktemp("report_to") / "ws"
    root.mkdir(mode=0o700)
    sft = _run(root, "sft", "--configs", "defaults", "tiny", "--set", "max_steps=3")
    rm = _run(root, "rm", "--configs", "defaults_rm", "tiny_rm", "--set", "max_steps=3")
    rl = _run(root, "rl", "--configs", "defaults_rl", "tiny_rl", *SMALL_RL)
    return ReportedRuns(sft, rm, rl)


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's ``tensorboard/`` folder (all its event files): tag → [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run / "tensorboard"
    assert folder.is_dir(), sorted(p.name for p in run.iterdir())
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def steps(series: list[tuple[int, float]]) -> list[int]:
    return sorted(step for step, _ in series)


def test_sft_reports_its_loss_to_tensorboard(reported: ReportedRuns) -> None:
    logged = scalars(reported.sft)
    assert steps(logged["train/loss"]) == [1, 2, 3], logged.keys()
    assert steps(logged["train/learning_rate"]) == [1, 2, 3]
    assert steps(logged["eval/loss"]) == [3]  # the evaluation at the end
    # The same numbers as metrics.jsonl.
    jsonl = {m["step"]: m["train/loss"] for m in read_metrics(reported.sft) if "train/loss" in m}
    assert [value for _, value in sorted(logged["train/loss"])] == pytest.approx([jsonl[s] for s in (1, 2, 3)])


def test_rm_reports_its_loss_and_accuracy_to_tensorboard(reported: ReportedRuns) -> None:
    logged = scalars(reported.rm)
    assert steps(logged["train/loss"]) == [1, 2, 3], logged.keys()
    assert steps(logged["eval/loss"]) == [3]
    assert steps(logged["eval/accuracy"]) == [3]
    assert all(0 <= value <= 1 for _, value in logged["eval/accuracy"])


def test_rl_reports_oatui_metric_names_to_tensorboard(reported: ReportedRuns) -> None:
    logged = scalars(reported.rl)
    for tag in ("ppo/score_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "perf/tokens_per_s"):
        assert steps(logged[tag]) == [1, 2], (tag, sorted(logged))
    assert steps(logged["eval/proxy"]) == [0, 2]  # judged before the first step and at the end
    jsonl = {m["step"]: m["ppo/score_mean"] for m in read_metrics(reported.rl) if "ppo/score_mean" in m}
    assert [value for _, value in sorted(logged["ppo/score_mean"])] == pytest.approx([jsonl[1], jsonl[2]], rel=1e-5)


def test_without_report_to_no_event_files_are_written(workspace: Path) -> None:
    run_oatui("train", "sft", "--configs", "defaults", "tiny", "--set", "max_steps=1", "--set", "val_fraction=0",
              workspace=workspace, check=True)
    (run,) = (workspace / "runs").iterdir()
    assert (run / "final").is_dir() and not (run / "tensorboard").exists()


def test_an_unknown_reporter_is_one_line_naming_the_known_ones(workspace: Path) -> None:
    result = run_oatui("train", "rl", "--configs", "defaults_rl", "--set", "report_to=[tensorboard, mlfow]",
                       "--print-config", workspace=workspace)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "report_to: unknown reporter 'mlfow'; known: tensorboard, wandb" in line


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_missing_tracker_package_is_one_line_before_anything_loads(workspace: Path) -> None:
    result = run_oatui("train", "sft", "--configs", "defaults", "tiny", "--set", "report_to=wandb", workspace=workspace)
    assert result.returncode != 0
    (run,) = (workspace / "runs").iterdir()
    error = (run / "error.txt").read_text().strip()
    assert error == ("report_to: wandb needs the wandb package, which is not installed "
                     "(pip install wandb, or drop wandb from report_to)")
    assert not (run / "final").exists()
