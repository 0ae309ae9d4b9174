"""Starting stages: the argv of each launcher, the run directory, and a detached supervisor.

Every stage runs under a supervisor process (:mod:`oatui.stages.supervisor`) started in its own
session, so that neither quitting the app nor losing the SSH session takes a run with it. The
command line either returns at once (``--detach``) or follows the run's log until it ends; Ctrl-C
there asks the run to stop (checkpoint first) rather than killing it.

Argv lists only, never a shell string: a config value cannot run anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from oatui.config import STAGES, RLConfig, StageConfig, deepspeed_config_path, from_yaml_file, load_stage_config, to_yaml
from oatui.data.datasets import resolve_dataset_path
from oatui.errors import UserError
from oatui.fsutil import UnreadableFile, iter_text_lines
from oatui.models.loading import LATEST_SFT, check_model_name
from oatui.netutil import free_port
from oatui.procutil import create_time
from oatui.stages.rundir import ACTIVE_STATES, RunDir, RunInfo, new_run_id, pickled_files, valid_run_id
from oatui.stages.runs import find_run, list_runs, refresh, require_latest_final
from oatui.workspace import Workspace

LAUNCHERS = ("auto", "python", "accelerate", "deepspeed")


@dataclass
class LaunchRequest:
    stage: str
    configs: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    launcher: str = "auto"
    gpus: str | None = None
    num_processes: int | None = None
    hostfile: str | None = None
    resume: str | None = None
    """A run id to continue instead of starting a new run."""
    after: str | None = None
    """A run id, or a stage name (its newest run), to wait for: this run starts when that one succeeds."""


def parse_gpus(gpus: str | None, available: int | None = None) -> list[int]:
    """``"0,1"`` → ``[0, 1]``, checked against the GPUs this machine has (``available``; None: ask NVML)."""
    if gpus is None or gpus.strip() == "":
        return []
    indices = []
    for part in gpus.split(","):
        part = part.strip()
        if not part.isdigit():
            raise UserError(f"--gpus {gpus}: expected GPU indices such as 0,1,2")
        indices.append(int(part))
    if len(set(indices)) != len(indices):
        raise UserError(f"--gpus {gpus}: a GPU is listed twice")
    count = gpu_count() if available is None else available
    missing = [i for i in indices if i >= count]
    if missing:
        have = "no NVIDIA GPU" if count == 0 else f"{count} GPU{'s' if count != 1 else ''} (0-{count - 1})"
        raise UserError(f"--gpus {gpus}: GPU {missing[0]} does not exist; this machine has {have}")
    return indices


def gpu_count() -> int:
    """GPUs NVML can see; 0 without a driver. Cheap and without torch, for the launcher's checks."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no library, no driver: no GPUs
        return 0


def choose_launcher(requested: str, config: StageConfig, gpus: list[int], num_processes: int, hostfile: str | None) -> str:
    if requested not in LAUNCHERS:
        raise UserError(f"--launcher {requested}: expected one of {', '.join(LAUNCHERS)}")
    if requested != "auto":
        return requested
    if hostfile or config.deepspeed:
        return "deepspeed"
    if num_processes > 1:
        return "accelerate"
    return "python"


def stage_argv(
    stage: str,
    run_dir: Path,
    launcher: str,
    gpus: list[int],
    num_processes: int,
    hostfile: str | None = None,
) -> list[str]:
    module = f"oatui.train.{stage}"
    script = ["--run-dir", str(run_dir)]
    python = sys.executable
    if launcher == "python":
        return [python, "-m", module, *script]
    if launcher == "accelerate":
        argv = [python, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                "--num_machines", "1", "--main_process_port", str(free_port()), "--dynamo_backend", "no",
                "--mixed_precision", "no"]
        if gpus:
            argv += ["--gpu_ids", ",".join(map(str, gpus))]
            if num_processes > 1:
                argv.append("--multi_gpu")
        else:
            # accelerate's --cpu starts a single process; torchrun (--multi_gpu) starts N, each on the CPU with gloo.
            argv.append("--multi_gpu" if num_processes > 1 else "--cpu")
        return [*argv, "-m", module, *script]
    if launcher == "deepspeed":
        argv = [python, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port())]
        if hostfile:
            argv += ["--hostfile", hostfile]
            if gpus:
                argv += ["--include", "@".join(f"{host}:{','.join(map(str, gpus))}" for host in _hosts(hostfile))]
        elif gpus:
            argv += ["--include", f"localhost:{','.join(map(str, gpus))}"]
        else:
            argv += ["--num_gpus", str(num_processes)]
        return [*argv, "--module", module, *script]
    raise UserError(f"--launcher {launcher}: expected one of {', '.join(LAUNCHERS)}")


def _hosts(hostfile: str) -> list[str]:
    hosts = []
    try:
        lines = list(iter_text_lines(hostfile, max_line_bytes=1 << 16))
    except UnreadableFile as error:
        raise UserError(f"--hostfile {error}") from None
    for number, line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].startswith("slots=")):
            raise UserError(f"{hostfile}:{number}: expected 'HOST slots=N'")
        hosts.append(parts[0])
    if not hosts:
        raise UserError(f"{hostfile}: no hosts listed")
    return hosts


def _check_inputs(stage: str, config: StageConfig, workspace: Workspace, queued: bool = False) -> None:
    """The cheap checks that must fail before a run directory exists. A ``queued`` run (``--after``)
    skips the ``latest`` checks: the run it waits for may be the one that makes that model, and the
    stage resolves ``latest`` itself when it starts."""
    check_model_name(config.model_name)
    if config.model_name == LATEST_SFT and not queued:
        require_latest_final(workspace.root, "sft", "model_name")
    for name in ("sft_model", "rm_model"):
        value = getattr(config, name, None)
        if value:
            check_model_name(value)
    if isinstance(config, RLConfig):
        # `latest` is resolved again when the stage starts; a workspace without such a run fails here,
        # before a run folder exists. A remotely served RM needs no local one (unless it makes the values).
        remote_rm = bool(os.environ.get("TRITON_HOST_RM") or config.triton_host_rm) and config.value_model != "rm"
        for stage_name, value in (("sft", config.sft_model), ("rm", None if remote_rm else config.rm_model)):
            if value == "latest" and not queued:
                require_latest_final(workspace.root, stage_name)
    for spec in config.datasets + list(getattr(config, "prompts", None) or []):
        resolve_dataset_path(spec, workspace.root)
    if config.deepspeed:
        deepspeed_config_path(config.deepspeed)


def prepare(request: LaunchRequest, workspace: Workspace) -> RunDir:
    """Validate everything, then write the run directory (state ``queued``). Nothing starts yet."""
    if request.stage not in STAGES:
        raise UserError(f"unknown stage {request.stage!r}; expected one of {', '.join(STAGES)}")
    if request.hostfile is not None and not Path(request.hostfile).is_file():
        raise UserError(f"--hostfile {request.hostfile}: no such file")
    if request.hostfile:
        _hosts(request.hostfile)
        # The stage starts in its run folder: a relative path would name nothing there.
        request = replace(request, hostfile=str(Path(request.hostfile).absolute()))
    if request.resume:
        if request.after:
            raise UserError("--after does not go with --resume; resume the run once the other one has ended")
        return _prepare_resume(request, workspace)
    parent = resolve_after(request.after, workspace) if request.after else None
    if not request.configs:
        raise UserError(f"--configs: name at least one section, e.g. --configs {_default_sections(request.stage)}")
    config = load_stage_config(request.stage, request.configs, request.overrides, workspace.root)
    gpus = parse_gpus(request.gpus)
    num_processes = request.num_processes or max(1, len(gpus))
    if request.num_processes is not None and request.num_processes < 1:
        raise UserError("--num-processes: must be at least 1")
    if gpus and request.num_processes and request.num_processes != len(gpus):
        raise UserError(f"--num-processes {request.num_processes} does not match --gpus {request.gpus}")
    launcher = choose_launcher(request.launcher, config, gpus, num_processes, request.hostfile)
    _check_inputs(request.stage, config, workspace, queued=parent is not None)
    run_id = new_run_id(request.stage)
    run_path = workspace.runs / run_id
    info = RunInfo(
        id=run_id,
        stage=request.stage,
        argv=stage_argv(request.stage, run_path, launcher, gpus, num_processes, request.hostfile),
        configs=list(request.configs),
        overrides=list(request.overrides),
        launcher=launcher,
        gpus=",".join(map(str, gpus)) or None,
        num_processes=num_processes,
        workspace=str(workspace.root),
        hostfile=request.hostfile,
        after=parent,
    )
    return RunDir.create(workspace.runs, info, to_yaml(config))


def resolve_after(after: str, workspace: Workspace) -> str:
    """``--after``: a run id (or a unique start of one), or ``sft``/``rm``/``rl`` for the newest run of
    that stage, queued and running ones included. A run that already failed or stopped is refused."""
    if after in STAGES:
        newest = next((v for v in list_runs(workspace.runs) if v.stage == after), None)
        if newest is None:
            raise UserError(f"--after {after}: no {after} run in {workspace.runs}")
        parent = newest.path
    else:
        try:
            parent = find_run(workspace.runs, after).path
        except UserError as error:
            raise UserError(f"--after {after}: {error}") from None
    run = RunDir(parent)
    try:
        info = refresh(run)
    except ValueError as error:
        raise UserError(f"--after {after}: {error}") from None
    if info.state in ("failed", "stopped"):
        raise UserError(f"--after {after}: run {run.id} already {info.state}; nothing to wait for")
    return run.id


def _default_sections(stage: str) -> str:
    return {"sft": "defaults tiny", "rm": "defaults_rm tiny_rm", "rl": "defaults_rl tiny_rl"}[stage]


def _prepare_resume(request: LaunchRequest, workspace: Workspace) -> RunDir:
    run_id = request.resume or ""
    if not valid_run_id(run_id) or not (workspace.runs / run_id).is_dir():
        raise UserError(f"--resume {run_id}: no such run in {workspace.runs}")
    if request.configs or request.overrides:
        raise UserError("--resume continues a run with its own config.yaml; drop --configs/--set")
    run = RunDir(workspace.runs / run_id)
    try:
        info = run.read_info()
    except ValueError as error:
        raise UserError(f"--resume {run_id}: {error}") from None
    if info.stage != request.stage:
        raise UserError(f"--resume {run_id}: that is a {info.stage} run, not {request.stage}")

    info = refresh(run, info)
    if info.state in ACTIVE_STATES:
        raise UserError(f"--resume {run_id}: the run is still {info.state} (pid {info.pid})")
    if info.state == "succeeded":
        raise UserError(f"--resume {run_id}: the run already succeeded")
    from_yaml_file(request.stage, run.config_path)  # still valid with this version of oatui
    checkpoint = run.latest_checkpoint()
    for pickled in pickled_files(checkpoint) if checkpoint is not None else []:
        raise UserError(f"--resume {run_id}: {pickled}: refusing a checkpoint that holds a pickle "
                        "(loading one can run any code); oatui never writes one")
    if request.num_processes is not None and request.num_processes < 1:
        raise UserError("--num-processes: must be at least 1")
    gpus = parse_gpus(request.gpus if request.gpus is not None else info.gpus)
    launcher = info.launcher if request.launcher == "auto" else request.launcher
    if launcher not in LAUNCHERS:
        raise UserError(f"--resume {run_id}: {run.info_path}: launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    num_processes = request.num_processes or info.num_processes
    if num_processes < 1:
        raise UserError(f"--resume {run_id}: {run.info_path}: num_processes {num_processes} is below 1")
    hostfile = request.hostfile or info.hostfile
    if hostfile:
        _hosts(hostfile)
    run.update_info(
        state="queued",
        argv=stage_argv(request.stage, run.path, launcher, gpus, num_processes, hostfile),
        launcher=launcher,
        gpus=",".join(map(str, gpus)) or None,
        num_processes=num_processes,
        hostfile=hostfile,
        resumes=info.resumes + 1,
        exit_code=None,
        signal=None,
        error=None,
        ended=None,
        pid=None,
        pid_started=None,
        supervisor_pid=None,
        supervisor_started=None,
        stop_requested=False,
    )
    return run


def spawn_supervisor(run: RunDir) -> int:
    """Start the run's supervisor in a new session, detached from this terminal; returns its pid."""
    with open(run.path / "supervisor.log", "ab") as log:
        process = subprocess.Popen(  # noqa: S603 - a fixed argv, no shell
            [sys.executable, "-m", "oatui.stages.supervisor", "--run-dir", str(run.path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=run.path,
            close_fds=True,
        )
    run.update_info(supervisor_pid=process.pid, supervisor_started=create_time(process.pid))
    return process.pid


def launch(request: LaunchRequest, workspace: Workspace) -> RunDir:
    run = prepare(request, workspace)
    spawn_supervisor(run)
    return run


def stage_environment(info: RunInfo, run: RunDir) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["OATUI_RUN_DIR"] = str(run.path)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if info.gpus and info.launcher != "deepspeed":
        # deepspeed picks GPUs itself from --include; the others see only the GPUs asked for.
        env["CUDA_VISIBLE_DEVICES"] = info.gpus
    return env
