"""Check every GPU path of oatui in one command, within a time budget, and bring the numbers back.

Run from the repository root (``bash bench/gpu_check.sh`` calls this). Each step runs a command as a
user would type it (the list is in README.md, "Checking a GPU machine"), with its own time limit,
even if an earlier step failed, and ends ``ok``, ``failed`` (with one line saying why) or
``skipped``. Everything goes under ``$OUT`` (``./gpu-check/`` when ``$OUT`` is unset): one log per
step in ``logs/``, ``summary.md`` (the table printed at the end), ``steps.json`` (each step's
command, result, time and peak GPU memory), the workspace the steps use (``workspace/``,
``OATUI_WORKSPACE`` for every step), ``environment.json``, ``nvidia-smi.txt``, the GPU snapshot
``gpus.json`` and the 20-second recording ``gpus-recording.jsonl`` (a replay file:
``oatui gpus --replay``). Without a CUDA GPU it says so in one line, runs the steps that need
none and exits 0.

    bash bench/gpu_check.sh                     # every step, about 5-8 minutes on one H100
    bash bench/gpu_check.sh --only kernel-exact kernel-bench
    bash bench/gpu_check.sh --list              # the steps and their commands

The same file holds the checks that have no command of their own (``environment``,
``kernel-exactness``, ``compare-served``); the steps call them as
``.venv/bin/python bench/gpu_check.py CHECK``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "gpu-check"
DEFAULT_BUDGET_S = 480.0  # the 8 minutes on one H100
NOT_SELECTED = "not in --only"
CHAT_PROMPT = "How do I get started with baking bread?"


class StepFailed(Exception):
    """A step's command ran, but what it produced is wrong: the message is the one line why."""


class BadInput(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


def out_dir() -> Path:
    return Path(os.environ.get("OUT") or DEFAULT_OUT).absolute()


# ---------------------------------------------------------------------------------------------
# The steps


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    #: The command as README.md shows it. ``$OUT``, ``$HTTP``, ``$GRPC``, ``$METRICS`` (free loopback
    #: ports), ``$SFT_RUN`` and ``$RM_RUN`` (the newest succeeded runs) are filled in when it runs;
    #: leading ``NAME=value`` words go to its environment; a final ``> FILE`` takes its stdout.
    command: str
    timeout: float
    needs_gpu: bool = True
    #: Steps that must have ended ``ok`` first (else this one is skipped, saying which).
    needs: tuple[str, ...] = ()
    #: Started in the background and collected after the other steps.
    background: bool = False
    #: Run even when the time budget is spent (cleaning up).
    always: bool = False


OATUI = ".venv/bin/oatui"
PYTHON = ".venv/bin/python"
SFT_VARIANTS = {
    "sft-lora-8bit": "LoRA on 8-bit weights, fp16",
    "sft-4bit": "LoRA on 4-bit (NF4) weights, bf16",
    "sft-adamw-8bit": "full model, bitsandbytes 8-bit AdamW, bf16",
    "sft-bf16": "full model, AdamW, bf16 (the policy below)",
}

STEPS: tuple[Step, ...] = (
    Step("environment", "driver, CUDA, GPU, torch build, nvidia-smi",
         f"{PYTHON} bench/gpu_check.py environment", 90, needs_gpu=False),
    Step("gpus", "oatui gpus --json against the driver",
         f"{OATUI} gpus --json > $OUT/gpus.json", 60, needs_gpu=False),
    Step("gpus-recording", "20 s recording while the next steps run",
         f"{OATUI} gpus --json --watch --count 20 > $OUT/gpus-recording.jsonl", 90, background=True),
    Step("kernel-exact", "Triton kernel vs the float64 reference on CUDA (fp32/bf16/fp16)",
         f"{PYTHON} bench/gpu_check.py kernel-exactness", 180),
    Step("kernel-bench", "kernel time, GB/s, share of a copy, vs the classic loop",
         f"{PYTHON} bench/bench_kernel.py --device cuda --repeats 20", 180),
    *(Step(name, f"Pythia-160m-shaped SFT: {title}",
           f"{OATUI} train sft --configs defaults gpu-check gpu-check-{name.removeprefix('sft-')}", 180)
      for name, title in SFT_VARIANTS.items()),
    Step("rm", "Pythia-160m-shaped RM, bf16",
         f"{OATUI} train rm --configs defaults_rm gpu-check", 180),
    Step("export-policy", "policy on KIND_GPU",
         f"{OATUI} export --mode policy --model $SFT_RUN --instance-kind gpu --force", 60, needs=("sft-bf16",)),
    Step("export-rm", "rm on KIND_GPU",
         f"{OATUI} export --mode rm --model $RM_RUN --instance-kind gpu --force", 60, needs=("rm",)),
    Step("export-ref", "ref on KIND_GPU",
         f"{OATUI} export --mode ref --model $SFT_RUN --instance-kind gpu --force", 60, needs=("sft-bf16",)),
    Step("serve", "the bundled tritonserver on the GPU",
         f"{OATUI} serve --detach --http-port $HTTP --grpc-port $GRPC --metrics-port $METRICS --ready-timeout 150",
         180, needs=("export-policy", "export-rm", "export-ref")),
    Step("chat", "a streamed answer from the served policy",
         f'{OATUI} chat --url 127.0.0.1:$GRPC --max-new-tokens 64 --seed 0 "{CHAT_PROMPT}"', 60, needs=("serve",)),
    Step("served-vs-local", "served RM scores and ref log-probs vs in-process",
         f"{PYTHON} bench/gpu_check.py compare-served --url 127.0.0.1:$GRPC", 120, needs=("serve",)),
    Step("rl", "PPO steps on CUDA, Triton kernel, scored through the server",
         f"TRITON_HOST_RM=127.0.0.1:$GRPC/rm TRITON_HOST_REF=127.0.0.1:$GRPC/ref "
         f"{OATUI} train rl --configs defaults_rl gpu-check-rl", 240, needs=("serve",)),
    Step("serve-stop", "stop the server (whenever serve ran)", f"{OATUI} serve --stop", 60, needs=("serve",),
         always=True),
    Step("serve-bench", "streaming through Triton vs in-process, both on the GPU; 1 and 4 streams at once",
         f"{PYTHON} bench/bench_serve.py --device cuda --prompts 8 --rounds 2 --warmup 1 --concurrency 1 4", 240,
         needs=("sft-bf16",)),
)
STEP_NAMES = tuple(step.name for step in STEPS)


@dataclass
class Result:
    step: Step
    status: str = "pending"  # ok | failed | skipped
    detail: str = ""
    seconds: float = 0.0
    command: str = ""  # as run, variables filled in
    gpu_memory_peak_mib: float | None = None
    gpu_memory_start_mib: float | None = None
    log: str = ""
    started: float = 0.0
    ended: float | None = None  # when a background step's process ended

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.step.name, "title": self.step.title, "command": self.step.command,
                "run_as": self.command, "needs_gpu": self.step.needs_gpu, "status": self.status,
                "detail": self.detail, "seconds": round(self.seconds, 2),
                "gpu_memory_peak_mib": self.gpu_memory_peak_mib, "gpu_memory_start_mib": self.gpu_memory_start_mib,
                "log": self.log}


# ---------------------------------------------------------------------------------------------
# GPU memory, sampled from nvidia-smi while a step runs


class MemorySampler:
    """The largest ``memory.used`` of one GPU seen by nvidia-smi, polled every half second."""

    def __init__(self, gpu: str) -> None:
        self.gpu = gpu
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> float | None:
        try:
            done = subprocess.run(["nvidia-smi", "-i", self.gpu, "--query-gpu=memory.used",
                                   "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            return float(done.stdout.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def start(self) -> float | None:
        first = self.read()
        self.peak = first
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-memory", daemon=True)
        self._thread.start()
        return first

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            value = self.read()
            if value is not None and (self.peak is None or value > self.peak):
                self.peak = value

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self.peak


# ---------------------------------------------------------------------------------------------
# Running one step


def resolve_executable(word: str) -> str:
    """``.venv/bin/X`` from the repository root, or X beside this interpreter when there is no .venv."""
    if word.startswith(".venv/bin/"):
        local = ROOT / word
        if local.exists():
            return str(local)
        beside = Path(sys.executable).parent / word.removeprefix(".venv/bin/")
        return str(beside) if beside.exists() else word
    return word


def expand(command: str, variables: dict[str, str]) -> tuple[dict[str, str], list[str], str | None]:
    """(environment, argv, stdout file) of a step's command with its variables filled in."""
    words = shlex.split(command)
    stdout_file = None
    if len(words) >= 2 and words[-2] == ">":
        stdout_file = words[-1]
        words = words[:-2]

    def fill(text: str) -> str:
        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in variables:
                raise StepFailed(f"${name} is not known")
            return variables[name]

        return re.sub(r"\$([A-Z_]+)", one, text)

    environment = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        environment[key] = fill(value)
    argv = [fill(word) for word in words]
    if argv:
        argv[0] = resolve_executable(argv[0])
    return environment, argv, fill(stdout_file) if stdout_file else None


def stop_group(process: subprocess.Popen) -> None:
    """Ctrl-C to the step's process group (``oatui train`` then stops its run, which saves a
    checkpoint), SIGTERM 20 s later, SIGKILL 5 s after that."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_line(path: Path) -> str:
    """The last line of a log that says something (a traceback's last line is the error)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


class Runner:
    def __init__(self, out: Path, budget: float, only: set[str] | None, workspace: Path | None = None,
                 pack: bool = False) -> None:
        self.out = out
        self.logs = out / "logs"
        self.workspace = workspace or out / "workspace"
        self.pack = pack
        self.deadline = time.monotonic() + budget
        self.only = only
        self.results: dict[str, Result] = {step.name: Result(step) for step in STEPS}
        self.has_gpu = False
        self.gpu_index = "0"
        self.sampler: MemorySampler | None = None
        self.background: dict[str, tuple[subprocess.Popen, Any, float]] = {}
        from oatui.netutil import free_ports

        http, grpc, metrics = free_ports(3)
        self.variables = {"OUT": str(out), "HTTP": str(http), "GRPC": str(grpc), "METRICS": str(metrics)}

    # -- environment of every step

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(OUT=str(self.out), OATUI_WORKSPACE=str(self.workspace), PYTHONUNBUFFERED="1")
        if self.has_gpu:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_index
        env.update(extra)
        return env

    def fill_runs(self) -> None:
        """``$SFT_RUN`` / ``$RM_RUN``: the newest succeeded run of each stage, as ``latest`` means."""
        from oatui.stages.runs import latest_final

        for stage, variable in (("sft", "SFT_RUN"), ("rm", "RM_RUN")):
            final = latest_final(self.workspace / "runs", stage)
            if final is not None:
                self.variables[variable] = final.parent.name

    # -- one step

    def skip_reason(self, step: Step) -> str | None:
        if self.only is not None and step.name not in self.only and step is not STEPS[0]:
            return NOT_SELECTED
        if step.needs_gpu and not self.has_gpu:
            return "no CUDA GPU"
        # A step left out by --only does not hold back the steps after it: they use what the
        # workspace of an earlier check holds.
        # A clean-up step runs whenever what it cleans up was started, ok or not.
        started = ("ok", "failed") if step.always else ("ok",)
        missing = [need for need in step.needs
                   if self.results[need].status not in started and self.results[need].detail != NOT_SELECTED]
        if missing:
            return f"needs {', '.join(missing)} (not ok)"
        if not step.always and step is not STEPS[0] and self.deadline - time.monotonic() < 5:
            return "the time budget is spent"
        return None

    def run(self, step: Step) -> Result:
        result = self.results[step.name]
        reason = self.skip_reason(step)
        if reason:
            result.status, result.detail = "skipped", reason
            self.report(result)
            return result
        self.fill_runs()
        log = self.logs / f"{STEP_NAMES.index(step.name) + 1:02d}-{step.name}.log"
        result.log = str(log.relative_to(self.out))
        try:
            extra_env, argv, stdout_file = expand(step.command, self.variables)
        except StepFailed as error:
            result.status, result.detail = "failed", str(error)
            self.report(result)
            return result
        result.command = shlex.join([f"{k}={v}" for k, v in extra_env.items()] + argv) + (
            f" > {stdout_file}" if stdout_file else "")
        remaining = self.deadline - time.monotonic()
        timeout = step.timeout if step.always else max(1.0, min(step.timeout, remaining))
        result.started = time.monotonic()
        log_handle = open(log, "w", encoding="utf-8")
        log_handle.write(f"$ {result.command}\n")
        log_handle.flush()
        stdout = open(stdout_file, "w", encoding="utf-8") if stdout_file else log_handle
        try:
            process = subprocess.Popen(argv, cwd=ROOT, env=self.environment(extra_env), stdout=stdout,
                                       stderr=log_handle, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as error:
            result.status, result.detail = "failed", f"cannot start {argv[0]}: {error.strerror or error}"
            log_handle.close()
            if stdout is not log_handle:
                stdout.close()
            self.report(result)
            return result
        if step.background:
            self.background[step.name] = (process, (log_handle, stdout), timeout)

            def note_end() -> None:
                process.wait()
                result.ended = time.monotonic()

            threading.Thread(target=note_end, name=f"{step.name}-end", daemon=True).start()
            print(f"[gpu-check] {step.name}: started in the background", flush=True)
            return result
        if self.sampler is not None:
            result.gpu_memory_start_mib = self.sampler.start()
        try:
            process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            stop_group(process)
            timed_out = True
        except KeyboardInterrupt:
            stop_group(process)  # it runs in its own session: Ctrl-C here did not reach it
            raise
        finally:
            if self.sampler is not None:
                result.gpu_memory_peak_mib = self.sampler.stop()
            log_handle.close()
            if stdout is not log_handle:
                stdout.close()
        self.finish(result, process.returncode, timed_out, timeout)
        return result

    def finish(self, result: Result, returncode: int | None, timed_out: bool, timeout: float) -> None:
        result.seconds = (result.ended or time.monotonic()) - result.started
        log = self.out / result.log
        if timed_out:
            result.status, result.detail = "failed", f"timed out after {timeout:.0f} s; {last_line(log)}"
        elif returncode != 0:
            result.status, result.detail = "failed", f"exit {returncode}: {last_line(log)}"
        else:
            try:
                result.detail = SUMMARIES.get(result.step.name, lambda r, s: "")(result, self)
                result.status = "ok"
            except StepFailed as error:
                result.status, result.detail = "failed", str(error)
            except Exception as error:  # noqa: BLE001 - a summary that breaks is that step's failure, not the run's
                result.status, result.detail = "failed", f"reading its output: {type(error).__name__}: {error}"
        self.report(result)

    def collect_background(self) -> None:
        for name, (process, handles, timeout) in self.background.items():
            result = self.results[name]
            left = max(1.0, timeout - (time.monotonic() - result.started))
            try:
                process.wait(timeout=left)
                timed_out = False
            except subprocess.TimeoutExpired:
                stop_group(process)
                timed_out = True
            for handle in set(handles):
                handle.close()
            self.finish(result, process.returncode, timed_out, timeout)

    def report(self, result: Result) -> None:
        extra = f" ({result.seconds:.1f} s)" if result.status != "skipped" else ""
        print(f"[gpu-check] {result.step.name}: {result.status}{extra} {result.detail}".rstrip(), flush=True)
        self.save()

    def save(self) -> None:
        steps = [self.results[name].to_dict() for name in STEP_NAMES]
        text = json.dumps({"gpu": self.has_gpu, "steps": steps}, indent=2) + "\n"
        (self.out / "steps.json").write_text(text, encoding="utf-8")

    # -- the whole check

    def main(self) -> int:
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            (self.out / "steps.json").touch()
        except OSError as error:
            raise BadInput(f"OUT={self.out}: cannot write there ({error.strerror or error})") from None
        environment = self.run(STEPS[0])
        facts = read_json(self.out / "environment.json") if environment.status == "ok" else {}
        self.has_gpu = bool(facts.get("cuda_available"))
        if not self.has_gpu:
            why = facts.get("no_gpu_reason") or environment.detail or "no CUDA GPU"
            print(f"[gpu-check] no CUDA GPU here ({why}): only the steps that need no GPU run", flush=True)
        else:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            self.gpu_index = visible if visible else "0"
            if shutil.which("nvidia-smi"):
                self.sampler = MemorySampler(self.gpu_index)
        try:
            for step in STEPS[1:]:
                self.run(step)
            self.collect_background()
        finally:
            # Interrupted between serve and serve-stop: the detached server must not outlive the check.
            serve, stop = self.results.get("serve"), self.results.get("serve-stop")
            if serve and stop and serve.status in ("ok", "failed") and stop.status == "pending":
                self.run(stop.step)
            for process, _, _ in self.background.values():
                if process.poll() is None:
                    stop_group(process)
        table = summary_table([self.results[name] for name in STEP_NAMES], facts)
        (self.out / "summary.md").write_text(table + "\n", encoding="utf-8")
        print()
        print(table)
        if self.pack:
            self.pack_logs()
        print(f"\nlogs and results: {self.out}")
        return 0

    def pack_logs(self) -> None:
        import tarfile

        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as archive:
            archive.add(self.logs, arcname="logs")
        shutil.rmtree(self.logs)
        for result in self.results.values():
            if result.log:
                result.log = f"logs.tar.gz:{result.log}"
        self.save()


def summary_table(results: list[Result], facts: dict[str, Any]) -> str:
    device = facts.get("gpu_name") or "no CUDA GPU"
    lines = [f"GPU check: {device}; torch {facts.get('torch', '?')} (CUDA {facts.get('torch_cuda') or '-'}), "
             f"driver {facts.get('driver') or '-'}",
             "",
             "| step | result | time | peak GPU memory | detail |",
             "|---|---|---:|---:|---|"]
    for result in results:
        time_text = f"{result.seconds:.1f} s" if result.status != "skipped" else ""
        memory = ""
        if result.gpu_memory_peak_mib is not None:
            memory = f"{result.gpu_memory_peak_mib / 1024:.1f} GiB"
            if result.gpu_memory_start_mib is not None:
                memory += f" (+{(result.gpu_memory_peak_mib - result.gpu_memory_start_mib) / 1024:.1f})"
        detail = result.detail.replace("|", "/")
        lines.append(f"| {result.step.name} | {result.status} | {time_text} | {memory} | {detail} |")
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "failed", "skipped")}
    lines.append("")
    lines.append(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped")
    return "\n".join(lines)


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------------------------
# What each step's output says (one line; StepFailed when it is wrong)


def _environment(result: Result, runner: Runner) -> str:
    facts = read_json(runner.out / "environment.json")
    if not facts:
        raise StepFailed("environment.json was not written")
    if not facts.get("cuda_available"):
        return f"torch {facts.get('torch')}: {facts.get('no_gpu_reason')}"
    return (f"{facts.get('gpu_name')}, {facts.get('gpu_memory_gib')} GiB, sm_{facts.get('capability')}; "
            f"driver {facts.get('driver')} (CUDA {facts.get('driver_cuda')}); torch {facts.get('torch')} "
            f"built for CUDA {facts.get('torch_cuda')}")


def _gpus(result: Result, runner: Runner) -> str:
    text = (runner.out / "gpus.json").read_text(encoding="utf-8").strip()
    snapshot = json.loads(text.splitlines()[0]) if text else None
    if not isinstance(snapshot, dict) or "gpus" not in snapshot:
        raise StepFailed("oatui gpus --json printed no snapshot")
    gpus = snapshot["gpus"]
    if runner.has_gpu and not gpus:
        raise StepFailed(f"no GPU in the snapshot although CUDA sees one: {snapshot.get('notice')}")
    if not gpus:
        return f"no GPUs: {snapshot.get('notice')}"
    first = gpus[0]
    used = (first.get("memory_used") or 0) / 2**30
    total = (first.get("memory_total") or 0) / 2**30
    missing = sorted(key for key, value in first.items() if value is None)
    return (f"{len(gpus)} GPU(s), {first.get('name')}, {used:.1f}/{total:.1f} GiB, driver "
            f"{snapshot.get('driver_version')}; N/A: {', '.join(missing) or 'none'}")


def _recording(result: Result, runner: Runner) -> str:
    from oatui.monitor.sampler import read_recording

    path = runner.out / "gpus-recording.jsonl"
    snapshots = read_recording(path)  # the replay's own reader: a file it cannot play is an error here
    if len(snapshots) < 2:
        raise StepFailed(f"{len(snapshots)} snapshot(s) recorded")
    busiest = max((gpu.utilization_gpu or 0) for snapshot in snapshots for gpu in snapshot.gpus)
    peak = max((gpu.memory_used or 0) for snapshot in snapshots for gpu in snapshot.gpus) / 2**30
    processes = max((len(gpu.processes) for snapshot in snapshots for gpu in snapshot.gpus), default=0)
    return (f"{len(snapshots)} snapshots in {path.name} (oatui gpus --replay plays it); utilization up to "
            f"{busiest:.0f}%, memory up to {peak:.1f} GiB, up to {processes} process(es)")


def _last_output_line(result: Result, runner: Runner) -> str:
    line = last_line(runner.out / result.log)
    if not line:
        raise StepFailed("printed nothing")
    return line


def _kernel_bench(result: Result, runner: Runner) -> str:
    rows = [line for line in (runner.out / result.log).read_text().splitlines() if line.startswith("| ")]
    data = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]
    if not data:
        raise StepFailed("no table in the output")
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    last = dict(zip(header, data[-1]))
    return (f"{last.get('shape')}: triton {last.get('ours (triton) ms')} ms, {last.get('triton GB/s')} GB/s = "
            f"{last.get('of copy')} of a copy ({last.get('copy GB/s')} GB/s), {last.get('speedup')} the classic loop, "
            f"torch path {last.get('torch path ms')} ms (table in {result.log})")


def _newest_run(runner: Runner, stage: str, since_wall: float) -> Any:
    from oatui.stages.runs import list_runs

    for view in list_runs(runner.workspace / "runs"):
        if view.stage == stage and view.info is not None and view.info.created >= since_wall - 5:
            return view
    raise StepFailed(f"no {stage} run folder appeared")


def _metrics(view: Any) -> list[dict[str, Any]]:
    rows = []
    path = view.path / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _trainer_stage(stage: str) -> Callable[[Result, Runner], str]:
    def summary(result: Result, runner: Runner) -> str:
        view = _newest_run(runner, stage, time.time() - result.seconds)
        if view.state != "succeeded":
            raise StepFailed(f"run {view.id} ended {view.state}")
        rows = _metrics(view)
        losses = [row["train/loss"] for row in rows if "train/loss" in row]
        rates = [row["perf/tokens_per_s"] for row in rows if "perf/tokens_per_s" in row]
        parts = [f"run {view.id}", f"{max((row.get('step', 0) for row in rows), default=0)} steps"]
        if losses:
            parts.append(f"loss {losses[0]:.2f} -> {losses[-1]:.2f}")
        accuracy = [row["rm/accuracy"] for row in rows if "rm/accuracy" in row]
        if accuracy:
            parts.append(f"held-out accuracy {accuracy[-1]:.2f}")
        if rates:
            parts.append(f"{statistics.median(rates):.0f} tokens/s")
        return ", ".join(parts)

    return summary


def _export(result: Result, runner: Runner) -> str:
    name = result.step.name.removeprefix("export-")
    config = runner.workspace / "triton" / name / "config.pbtxt"
    text = config.read_text(encoding="utf-8")
    if "KIND_GPU" not in text:
        raise StepFailed(f"{config} has no KIND_GPU instance group")
    return f"{config.relative_to(runner.out)}: KIND_GPU"


def _serve(result: Result, runner: Runner) -> str:
    text = (runner.out / result.log).read_text(errors="replace")
    match = re.search(r"; log (\S+)\s*$", text, re.MULTILINE)
    placed = []
    if match and Path(match.group(1)).exists():
        server_log = Path(match.group(1)).read_text(errors="replace")
        placed = re.findall(r"oatui (policy|rm|ref) \S+: .* on (\S+?),", server_log)
        shutil.copyfile(match.group(1), runner.out / "logs" / "tritonserver.log")
    devices = ", ".join(f"{model} on {device}" for model, device in placed) or "model placement not in the log"
    if placed and any(not device.startswith("cuda") for _, device in placed):
        raise StepFailed(f"a model is not on the GPU: {devices}")
    return f"ready on 127.0.0.1:{runner.variables['GRPC']} in {result.seconds:.1f} s; {devices}"


def _chat(result: Result, runner: Runner) -> str:
    text = (runner.out / result.log).read_text(errors="replace").split("\n", 1)[-1].strip()
    if not text:
        raise StepFailed("the answer is empty")
    return f"{len(text)} characters in {result.seconds:.1f} s: {text[:60]!r}"


def _rl(result: Result, runner: Runner) -> str:
    view = _newest_run(runner, "rl", time.time() - result.seconds)
    if view.state != "succeeded":
        raise StepFailed(f"run {view.id} ended {view.state}")
    rows = [row for row in _metrics(view) if "time/generate" in row]
    if not rows:
        raise StepFailed("no PPO step in metrics.jsonl")
    timed = rows[1:] or rows  # the first step warms up (kernel compilation, allocator)
    phases = ("generate", "score", "advantages", "train")
    split = ", ".join(f"{phase} {statistics.median(row[f'time/{phase}'] for row in timed):.3g}" for phase in phases
                      if all(f"time/{phase}" in row for row in timed))
    summary = f"run {view.id}, {len(rows)} steps; s per step: {split}"
    score = rows[-1].get("ppo/score_mean")
    if score is not None:
        summary += f"; score {score:.2f}"
    judged = [row for row in _metrics(view) if "eval/proxy" in row]
    if judged:
        gold = judged[-1].get("eval/gold")
        summary += f"; eval proxy {judged[-1]['eval/proxy']:.2f}" + (f", gold {gold:.2f}" if gold is not None else "")
    return summary


def _serve_bench(result: Result, runner: Runner) -> str:
    text = (runner.out / result.log).read_text(errors="replace")
    match = re.search(r"^Triton vs in-process loop:\s*(.*)$", text, re.MULTILINE)
    equal = re.search(r"in-process loop's \(same seeds\): (\d+/\d+)", text)
    if not match:
        raise StepFailed("no comparison line in the output")
    summary = f"{match.group(1)}; answers equal {equal.group(1) if equal else '?'}"
    # bench_serve.py's concurrency table: batched, then the same server one request at a time.
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) / ([\d.]+) ms \| (\d+) \| ([\d.]+) / ([\d.]+) ms "
                      r"\| (\S+) \| (\S+) \|$", text, re.MULTILINE)
    if rows:
        streams, rate, _, first, first_p95, _, _, _, ratio, serial_ratio = rows[-1]
        summary += (f"; {streams} streams at once: {rate} tokens/s in all ({ratio} one stream, {serial_ratio} one "
                    f"request at a time), first token {first} ms (p95 {first_p95} ms)")
    return summary


SUMMARIES: dict[str, Callable[[Result, Runner], str]] = {
    "environment": _environment,
    "gpus": _gpus,
    "gpus-recording": _recording,
    "kernel-exact": _last_output_line,
    "kernel-bench": _kernel_bench,
    **{name: _trainer_stage("sft") for name in SFT_VARIANTS},
    "rm": _trainer_stage("rm"),
    "export-policy": _export,
    "export-rm": _export,
    "export-ref": _export,
    "serve": _serve,
    "chat": _chat,
    "served-vs-local": _last_output_line,
    "rl": _rl,
    "serve-stop": _last_output_line,
    "serve-bench": _serve_bench,
}


# ---------------------------------------------------------------------------------------------
# Checks without a command of their own


def check_environment() -> int:
    """Driver, CUDA, GPU and library versions into ``$OUT/environment.json``; ``nvidia-smi`` into
    ``$OUT/nvidia-smi.txt``."""
    import platform
    from importlib import metadata

    import torch

    out = out_dir()
    out.mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                             "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for package in ("triton", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "deepspeed",
                    "nvidia-pytriton", "tritonclient", "nvidia-ml-py"):
        try:
            facts[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            facts[package] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi], capture_output=True, text=True, timeout=30)
        (out / "nvidia-smi.txt").write_text(done.stdout + done.stderr, encoding="utf-8")
        header = re.search(r"Driver Version:\s*(\S+).*CUDA Version:\s*(\S+)", done.stdout)
        if header:
            facts["driver"], facts["driver_cuda"] = header.group(1), header.group(2)
    if facts["cuda_available"]:
        properties = torch.cuda.get_device_properties(0)
        facts.update(gpu_name=properties.name, gpu_count=torch.cuda.device_count(),
                     gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                     capability=f"{properties.major}{properties.minor}", bf16=torch.cuda.is_bf16_supported())
    else:
        facts["no_gpu_reason"] = ("torch was built without CUDA" if torch.version.cuda is None
                                  else "torch.cuda.is_available() is false") + (
            "" if smi else "; nvidia-smi not found")
    (out / "environment.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    for key, value in facts.items():
        print(f"{key:16} {value}")
    return 0


#: (estimator, clamp and clip, whiten, γ, λ) of the exactness check.
COMBINATIONS = (("k1", False, True, 1.0, 0.95), ("k3", True, True, 0.99, 0.9), ("k2", True, False, 1.0, 0.95),
                ("abs", False, False, 0.99, 0.9), ("k3", False, True, 1.0, 1.0), ("abs", True, True, 0.99, 0.95))


def check_kernel_exactness() -> int:
    """The Triton kernel on CUDA tensors against the float64 reference: every estimator, clamp and
    clip, whitening on and off, γ and λ below 1, rows of length 0, 1 and longer than a chunk, with
    fp32, bf16 and fp16 inputs (the reference reads the same rounded values). ``backend="auto"``
    must pick the kernel for CUDA tensors."""
    import itertools

    import torch

    from oatui_kernels import fused_kl_reward_gae, reference_kl_reward_gae

    if not torch.cuda.is_available():
        raise BadInput("kernel-exactness: no CUDA device is available")
    device = torch.device("cuda")
    tolerance = 1e-5
    shapes = [([1100, 1025, 3, 0, 1, 700], 1100), ([4096] * 4 + [2048, 1, 17, 4095], 4096), ([64] * 200, 64)]
    worst = 0.0
    cases = 0
    failures = []
    for (lengths, tokens), dtype in itertools.product(shapes, (torch.float32, torch.bfloat16, torch.float16)):
        generator = torch.Generator().manual_seed(tokens + len(lengths))
        batch = len(lengths)
        logprobs = -3 * torch.rand(batch, tokens, generator=generator)
        ref_logprobs = logprobs + 0.3 * torch.randn(batch, tokens, generator=generator)
        values = torch.randn(batch, tokens, generator=generator)
        scores = 2 * torch.randn(batch, generator=generator)
        mask = torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]
        inputs = [t.to(dtype) for t in (logprobs, ref_logprobs, values, scores)] + [mask]
        on_gpu = [t.to(device) for t in inputs]
        # Each combination is a kernel compiled for this tile and input dtype: every estimator,
        # clamp and clip, whitening on and off and γ, λ below 1 for fp32; two for bf16 and fp16.
        combinations = COMBINATIONS if dtype == torch.float32 else COMBINATIONS[:2]
        for estimator, bounded, whiten, gamma, lam in combinations:
            options = dict(kl_coef=0.1, gamma=gamma, lam=lam, kl_estimator=estimator, whiten=whiten,
                           kl_clamp=0.2 if bounded else None, score_clip=1.0 if bounded else None)
            ours = fused_kl_reward_gae(*on_gpu, **options, backend="triton")
            reference = reference_kl_reward_gae(*[t.double() if t.is_floating_point() else t for t in inputs],
                                                **options)
            cases += 1
            for name, a, b in zip(("rewards", "advantages", "returns", "kl_sum"), ours, reference):
                if a.dtype != torch.float32 or a.device.type != "cuda":
                    failures.append(f"{name} is {a.dtype} on {a.device}")
                b = b.double()
                error = (a.double().cpu() - b).abs().max().item() / max(1.0, b.abs().max().item())
                worst = max(worst, error)
                if error > tolerance:
                    failures.append(f"{tuple(mask.shape)} {dtype} {options}: {name} off by {error:.1e}")
        auto = fused_kl_reward_gae(*on_gpu, kl_coef=0.1, backend="auto")
        forced = fused_kl_reward_gae(*on_gpu, kl_coef=0.1, backend="triton")
        if not all(torch.equal(a, b) for a, b in zip(auto, forced)):
            failures.append("backend='auto' on CUDA tensors does not give the Triton kernel's result")
    torch.cuda.synchronize()
    for failure in failures[:20]:
        print(failure)
    print(f"{cases} cases (shapes {[tuple((len(l), t)) for l, t in shapes]}, fp32/bf16/fp16): worst relative "
          f"error {worst:.1e} (tolerance {tolerance:.0e}); {len(failures)} failure(s)")
    return 1 if failures else 0


def check_compare_served(url: str) -> int:
    """Scores of the served ``rm`` and log-probs of the served ``ref`` against the same checkpoints
    in this process on the GPU, computed by the same functions (float32 on both sides)."""
    import numpy as np
    import torch

    from oatui.data.format import format_conversation
    from oatui.models.loading import load_for_inference
    from oatui.models.scoring import rm_max_length, score_texts, token_logprobs
    from oatui.serve.client import RefLogprobClient, ScoreClient
    from oatui.stages.runs import latest_final
    from oatui.workspace import Workspace

    runs = Workspace.open(os.environ.get("OATUI_WORKSPACE") or "workspace", create=False).root / "runs"
    sft, rm = latest_final(runs, "sft"), latest_final(runs, "rm")
    if sft is None or rm is None:
        raise BadInput(f"compare-served: the workspace's runs ({runs}) need a succeeded SFT and RM run")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = [("How do I get started with baking bread?", "Start with flour, water, salt and yeast."),
             ("What is a good way to learn a new language?", "Practise a little every day."),
             ("Why is the sky blue?", "Sunlight scatters off the air, and blue light scatters the most, "
              "so the sky looks blue from every direction during the day."),
             ("Give me three tips for sleeping better.", "Keep a schedule."),
             ("Explain recursion to a beginner.", "A function that calls itself on a smaller problem.")]
    rm_model, rm_tokenizer = load_for_inference(str(rm), "rm", device=device)
    texts = [format_conversation([("prompter", p), ("assistant", a)], rm_tokenizer.eos_token) for p, a in pairs]
    local_scores = score_texts(rm_model, rm_tokenizer, texts, rm_max_length(rm_model, rm_tokenizer), 16)
    with ScoreClient(f"{url}/rm", timeout=60) as client:
        served_scores = client.score(texts)
    score_error = max(abs(a - b) for a, b in zip(local_scores, served_scores))
    del rm_model
    ref_model, tokenizer = load_for_inference(str(sft), "ref", device=device)
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row
        mask[index, : len(row)] = 1
    with torch.no_grad():
        local = token_logprobs(ref_model, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
    local_logprobs = local.float().cpu().numpy()
    with RefLogprobClient(f"{url}/ref", timeout=60) as client:
        served_logprobs = client.logprobs(ids, mask)
    valid = mask[:, 1:].astype(bool)
    logprob_error = float(np.abs(local_logprobs - served_logprobs)[valid].max())
    tolerance = 1e-3
    print(f"rm scores served {[round(s, 4) for s in served_scores]}, in-process {[round(s, 4) for s in local_scores]}")
    print(f"rm: {len(texts)} scores, largest difference {score_error:.1e}; ref: {int(valid.sum())} log-probs, "
          f"largest difference {logprob_error:.1e} (tolerance {tolerance:.0e}, {device} on both sides)")
    return 0 if score_error <= tolerance and logprob_error <= tolerance else 1


# ---------------------------------------------------------------------------------------------
# Command line


CHECKS = ("environment", "kernel-exactness", "compare-served")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/gpu_check.sh",
        description="Check every GPU path of oatui (results under $OUT, else ./gpu-check/).",
        epilog=f"Steps: {', '.join(STEP_NAMES)}. Checks the steps call: {', '.join(CHECKS)}.",
    )
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (the others are skipped)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="S",
                        help=f"seconds for all steps together (default {DEFAULT_BUDGET_S:.0f}); "
                             "a step gets what is left when less than its own limit")
    parser.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    parser.add_argument("--workspace", metavar="DIR",
                        help="the workspace the steps share (default $OUT/workspace; it holds the models, gigabytes)")
    parser.add_argument("--pack", action="store_true",
                        help="at the end, pack logs/ into logs.tar.gz (fewer files to copy back)")
    parser.add_argument("check", nargs="?", choices=CHECKS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)

    def error(message: str) -> None:
        raise BadInput(message)

    parser.error = error  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    if args.only:
        unknown = [name for name in args.only if name not in STEP_NAMES]
        if unknown:
            raise BadInput(f"--only {' '.join(unknown)}: no such step; the steps are {', '.join(STEP_NAMES)}")
    if not (args.budget > 0 and args.budget < 1e6):
        raise BadInput(f"--budget {args.budget:g}: must be a number of seconds above 0")
    if args.check == "compare-served" and not args.url:
        raise BadInput("compare-served: --url HOST:GRPCPORT is required")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.check == "environment":
            return check_environment()
        if args.check == "kernel-exactness":
            return check_kernel_exactness()
        if args.check == "compare-served":
            return check_compare_served(args.url)
        if args.list:
            for step in STEPS:
                print(f"{step.name:16} {'GPU' if step.needs_gpu else '   '}  {step.command}")
            return 0
        out = out_dir()
        if out.exists() and not out.is_dir():
            raise BadInput(f"OUT={out}: not a folder")
        workspace = Path(args.workspace).expanduser().absolute() if args.workspace else None
        if workspace is not None and workspace.exists() and not workspace.is_dir():
            raise BadInput(f"--workspace {args.workspace}: not a folder")
        return Runner(out, args.budget, set(args.only) if args.only else None, workspace, args.pack).main()
    except BadInput as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
