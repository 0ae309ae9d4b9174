"""Faults done for real: stopped and killed stages, crashes during a checkpoint save, broken run
directories, concurrent writers, hostile config values, file permissions."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import read_metrics, run_oatui
from oatui.cli import main
from oatui.stages.rundir import RunDir
from oatui.stages.runs import list_runs, wait_for_end


def _seed(trained, workspace: Path) -> None:  # noqa: ANN001
    shutil.copytree(trained.tiny_base, workspace / "models" / "tiny-pythia")


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.1):  # noqa: ANN001, ANN202
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _last_step(run: Path) -> int:
    return RunDir(run).last_metrics().get("step", 0) if RunDir(run).last_metrics() else 0


@pytest.mark.slow
def test_stop_kill_and_resume_end_at_the_configured_step_count(trained, workspace: Path) -> None:  # noqa: ANN001
    _seed(trained, workspace)
    total = 30
    # Batches of 16: steps slow enough for a stop and a kill to land between checkpoints.
    run_id = run_oatui("train", "sft", "--configs", "defaults", "tiny", "--set", f"max_steps={total}",
                       "--set", "save_steps=10", "--set", "val_fraction=0", "--set", "logging_steps=1",
                       "--set", "per_device_train_batch_size=16",
                       "--detach", workspace=workspace, check=True).stdout.strip()
    run = workspace / "runs" / run_id

    # 1. A stop request: a checkpoint at the next step boundary, then 'stopped'.
    _wait_for(lambda: _last_step(run) >= 3, 240, "the first steps")
    run_oatui("runs", "stop", run_id, "--wait", workspace=workspace, check=True)
    info = _info(run)
    assert info["state"] == "stopped" and info["exit_code"] == 75
    stopped_at = RunDir(run).latest_checkpoint()
    assert stopped_at is not None and int(stopped_at.name.split("-")[1]) >= 3

    # 2. Resumed, then kill -9 of the stage process: 'failed' with the signal, within seconds.
    run_oatui("train", "sft", "--resume", run_id, "--detach", workspace=workspace, check=True)
    _wait_for(lambda: _last_step(run) >= 12 and RunDir(run).latest_checkpoint().name == "checkpoint-10", 240,
              "a step after checkpoint-10")
    os.kill(_info(run)["pid"], signal.SIGKILL)
    killed = time.time()
    _wait_for(lambda: _info(run)["state"] == "failed", 10, "the run to show failed")
    assert time.time() - killed < 5
    info = _info(run)
    assert info["signal"] == "SIGKILL" and "SIGKILL" in info["error"]
    listed = {r["id"]: r for r in json.loads(run_oatui("runs", "--json", workspace=workspace, check=True).stdout)}
    assert listed[run_id]["state"] == "failed"

    # 3. Resumed again from checkpoint-10: it ends at the configured total, in the same run directory.
    result = run_oatui("train", "sft", "--resume", run_id, workspace=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
    info = _info(run)
    assert info["state"] == "succeeded" and info["resumes"] == 2
    metrics = read_metrics(run)
    loss_steps = [m["step"] for m in metrics if "train/loss" in m]
    assert loss_steps == sorted(set(loss_steps)), "metrics are appended, never duplicated"
    assert loss_steps[-1] == total and metrics[-1]["total_steps"] == total
    assert sorted(int(p.name.split("-")[1]) for p in RunDir(run).complete_checkpoints())[-1] == total
    assert "resuming from checkpoint-10" in (run / "stdout.log").read_text()


@pytest.mark.slow
def test_a_checkpoint_cut_short_is_never_resumed_from(trained, workspace: Path) -> None:  # noqa: ANN001
    _seed(trained, workspace)
    run_id = run_oatui("train", "sft", "--configs", "defaults", "tiny", "--set", "max_steps=8",
                       "--set", "save_steps=4", "--set", "val_fraction=0", "--detach",
                       workspace=workspace, check=True).stdout.strip()
    run = workspace / "runs" / run_id
    _wait_for(lambda: RunDir(run).latest_checkpoint() is not None, 240, "checkpoint-4")
    # SIGTERM straight to the stage process (not through `oatui runs stop`): the same clean stop.
    os.kill(_info(run)["pid"], signal.SIGTERM)
    _wait_for(lambda: _info(run)["state"] == "stopped", 120, "the run to stop")
    before = [p.name for p in RunDir(run).complete_checkpoints()]
    assert before and before[-1] != "checkpoint-8"  # the stop's own checkpoint, at step 4 or just after

    # Continue the stage with a file-size limit: the next checkpoint's optimizer file cannot be written.
    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    stage = subprocess.run([sys.executable, "-m", "oatui.train.sft", "--run-dir", str(run)], cwd=run,
                           preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300)
    assert stage.returncode != 0
    assert f"resuming from {before[-1]}" in stage.stdout
    assert (run / "checkpoints" / ".partial" / "checkpoint-8").is_dir(), "the save was cut short"
    assert [p.name for p in RunDir(run).complete_checkpoints()] == before

    RunDir(run).update_info(state="failed")
    result = run_oatui("train", "sft", "--resume", run_id, workspace=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
    log = (run / "stdout.log").read_text()
    assert f"resuming from {before[-1]}" in log
    assert not (run / "checkpoints" / ".partial").exists()
    assert _info(run)["state"] == "succeeded"


def test_config_values_never_reach_a_shell(workspace: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = f"x; touch {marker}"
    result = run_oatui("train", "sft", "--configs", "defaults", "tiny", "--set", f"model_name={hostile}", workspace=workspace)
    assert result.returncode == 2 and "no such folder" in result.stderr
    result = run_oatui("train", "sft", "--configs", "defaults", "tiny", "--set", f"lr_scheduler_type=$(touch {marker})",
                       workspace=workspace)
    assert result.returncode == 2 and "lr_scheduler_type: expected one of" in result.stderr
    # A value that passes validation travels as data to the stage, never through a shell.
    result = run_oatui("train", "sft", "--configs", "defaults", "tiny", "--set", f"system_prompt=$(touch {marker})",
                       "--set", "max_steps=1", "--set", "val_fraction=0", workspace=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = (workspace / "runs").iterdir()
    assert all(isinstance(arg, str) for arg in _info(run)["argv"])
    assert f"system_prompt: $(touch {marker})" in (run / "config.yaml").read_text()
    assert not marker.exists()


def test_workspace_folders_and_run_files_are_private(trained) -> None:  # noqa: ANN001
    root = trained.root
    for folder in [root, root / "runs", root / "models", root / "runs" / trained.sft_run,
                   root / "runs" / trained.sft_run / "checkpoints", root / "runs" / trained.sft_run / "final"]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for name in ["run.json", "config.yaml", "stdout.log", "metrics.jsonl"]:
        path = root / "runs" / trained.sft_run / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (root / "runs" / trained.sft_run / "final").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_workspace_that_is_not_a_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    for workspace, problem in [(afile, "not a folder"), (afile / "sub", "cannot create it")]:
        assert main(["runs", "--workspace", str(workspace)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"oatui runs: error: --workspace {workspace}: {problem}") and err.count("\n") == 1
    assert afile.read_text() == ""


def test_trust_remote_code_is_off_unless_asked() -> None:
    from oatui.config import load_stage_config

    for stage, sections in [("sft", ["defaults", "tiny"]), ("rm", ["defaults_rm", "tiny_rm"]), ("rl", ["defaults_rl", "tiny_rl"])]:
        assert load_stage_config(stage, sections).trust_remote_code is False
    assert load_stage_config("sft", ["defaults"], ["trust_remote_code=true"]).trust_remote_code is True


RUN_JSON = {
    "id": "sft-20260101-000000-abcd", "stage": "sft", "state": "succeeded", "argv": ["python"], "pid": 1,
    "created": 1.0, "started": 1.0, "ended": 2.0, "exit_code": 0,
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(
    st.text(max_size=80),
    st.builds(lambda k, v: json.dumps({**RUN_JSON, k: v}),
              st.sampled_from(sorted(RUN_JSON)),
              st.one_of(st.none(), st.integers(), st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2),
                        st.floats(allow_nan=False))),
    st.builds(lambda n: json.dumps(RUN_JSON)[:n], st.integers(0, 120)),
))
def test_broken_run_json_is_an_error_row_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    runs = tmp_path / "ws" / "runs"
    folder = runs / RUN_JSON["id"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(text)
    (listed,) = list_runs(runs)
    assert listed.state in ("broken", "queued", "running", "succeeded", "failed", "stopped")
    if listed.info is None:
        assert listed.problem and "\n" not in listed.problem
    assert main(["runs", "--workspace", str(tmp_path / "ws")]) == 0
    assert main(["runs", "--json", "--workspace", str(tmp_path / "ws")]) == 0
    code = main(["runs", "stop", RUN_JSON["id"], "--workspace", str(tmp_path / "ws")])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1


CONFIG_TEXT = (Path(__file__).resolve().parent.parent / "configs" / "config.yaml").read_text()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1), junk=st.text(max_size=6), cut=st.booleans())
def test_a_corrupted_config_file_is_one_line_or_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     position: float, junk: str, cut: bool) -> None:
    from oatui.config import load_stage_config
    from oatui.errors import UserError

    at = int(position * len(CONFIG_TEXT))
    text = CONFIG_TEXT[:at] + junk + ("" if cut else CONFIG_TEXT[at + len(junk):])
    folder = tmp_path / "user-configs"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(text)
    monkeypatch.setenv("OATUI_CONFIG_PATH", str(folder))
    try:
        load_stage_config("sft", ["defaults", "tiny"])
    except UserError as error:
        assert "\n" not in str(error) and str(error)


@settings(max_examples=60, deadline=None)
@given(value=st.text(max_size=30), key=st.sampled_from(["learning_rate", "max_steps", "dtype", "datasets", "seed",
                                                         "val_fraction", "deepspeed", "nope", "peft_model"]))
def test_any_set_value_is_accepted_or_one_line(value: str, key: str) -> None:
    from oatui.config import load_stage_config
    from oatui.errors import UserError

    try:
        load_stage_config("sft", ["defaults", "tiny"], [f"{key}={value}"])
    except UserError as error:
        assert "\n" not in str(error) and str(error)


def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    target = tmp_path / "shared.jsonl"
    script = (
        "import sys\n"
        "from oatui.fsutil import append_jsonl_locked\n"
        "for i in range(300):\n"
        "    append_jsonl_locked(sys.argv[1], {'writer': sys.argv[2], 'i': i, 'pad': 'x' * (i % 50) * 40})\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, str(target), name]) for name in ("a", "b", "c")]
    assert all(w.wait(timeout=120) == 0 for w in writers)
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(records) == 900
    for name in "abc":
        assert [r["i"] for r in records if r["writer"] == name] == list(range(300))


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_the_run_directory(trained, workspace: Path) -> None:  # noqa: ANN001
    _seed(trained, workspace)
    secret = "hf_SeCrEt0123456789token"
    run_oatui("train", "sft", "--configs", "defaults", "tiny", "--set", "max_steps=2", "--set", "val_fraction=0",
              workspace=workspace, env={"HF_TOKEN": secret, "WANDB_API_KEY": secret}, check=True)
    (run,) = (workspace / "runs").iterdir()
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
