"""The SFT (and RM) stage evaluates its last step once: transformers already evaluates at the end of
training when it evaluates every eval_steps, so the stage's own last evaluation is only for when it
did not. A short real SFT run (six steps) checks the log and the metrics."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_oatui
from oatui.train.hf import evaluated_at


def test_evaluated_at_reads_the_trainers_log() -> None:
    history = [{"loss": 2.0, "step": 4}, {"eval_loss": 1.5, "step": 4}, {"loss": 1.9, "step": 6},
               {"train_runtime": 1.0, "step": 6}]
    assert evaluated_at(history, 4)
    assert not evaluated_at(history, 6)
    assert evaluated_at([*history, {"eval_accuracy": 0.7, "step": 6}], 6)
    assert not evaluated_at([], 6)


def test_a_short_sft_run_logs_its_final_evaluation_once(workspace: Path) -> None:
    # Evaluated at step 4 (eval_steps) and at the end of training (step 6) by the trainer itself.
    result = run_oatui("train", "sft", "--configs", "defaults", "tiny", "--set", "max_steps=6", "--set", "eval_steps=4",
                       workspace=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
    [run] = list((workspace / "runs").iterdir())
    log = (run / "stdout.log").read_text()
    evaluations = [line for line in log.splitlines() if line.startswith("{'eval_loss'")]
    assert len(evaluations) == 2, evaluations
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "eval/loss" in record] == [4, 6]
