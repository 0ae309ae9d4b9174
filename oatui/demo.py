"""The whole flow on the tiny default, headless: data → SFT → RM → RL → export → serve → chat → compare.

Used by ``oatui demo`` and by the app's ``a`` key. Every stage runs as a real run in the workspace
(a supervised subprocess, as ``oatui train`` starts it); the models are exported to the workspace's
Triton repository and served by a real tritonserver; the final phase judges the SFT and RL policies'
answers to held-out prompts two ways, by the reward model (the proxy RL optimised) and by the gold
judge it never saw, and the demo succeeds only if RL beats SFT on gold. Nothing here imports torch:
the app runs this in a thread.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oatui.data.rules import Stats
from oatui.data.sample import SAMPLE_FILE
from oatui.data.trees import iter_trees
from oatui.netutil import free_ports
from oatui.serve.record import ServerOptions
from oatui.serve.server import start_detached, status, stop
from oatui.stages.runs import refresh, stop_run, view
from oatui.workspace import Workspace

PHASES = ("data", "sft", "rm", "rl", "export", "serve", "chat", "compare", "stop")


@dataclass
class PhaseResult:
    name: str
    ok: bool | None = None
    """True: succeeded; False: failed; None: skipped (an earlier phase failed)."""
    seconds: float = 0.0
    metric: str = ""
    detail: str = ""


@dataclass(frozen=True)
class DemoEvent:
    """What the demo reports as it goes: a phase starting, progressing or ending, or a streamed piece."""

    kind: str  # "start" | "progress" | "end" | "piece"
    phase: str
    text: str = ""
    elapsed: float = 0.0
    result: PhaseResult | None = None


@dataclass
class DemoOptions:
    sft_configs: list[str] = field(default_factory=lambda: ["defaults", "tiny"])
    rm_configs: list[str] = field(default_factory=lambda: ["defaults_rm", "tiny_rm"])
    rl_configs: list[str] = field(default_factory=lambda: ["defaults_rl", "tiny_rl"])
    overrides: dict[str, list[str]] = field(default_factory=dict)
    """Extra ``--set`` values per stage (``{"rl": ["total_steps=20"]}``)."""
    held_out_prompts: int = 96
    max_new_tokens: int = 48
    chat_prompt: str | None = None


class PhaseFailed(Exception):
    pass


class Demo:
    def __init__(self, workspace: Workspace, report: Callable[[DemoEvent], None], options: DemoOptions | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.workspace = workspace
        self.report = report
        self.options = options or DemoOptions()
        self.should_stop = should_stop
        self.results: list[PhaseResult] = []
        self.models: dict[str, Path] = {}
        self.server: Any = None
        self.comparison: dict[str, Any] | None = None
        """``oatui eval``'s report of the SFT and RL policies, once the compare phase ran."""
        self._phase_start = 0.0

    # -- driving -------------------------------------------------------------------------------
    def run(self) -> list[PhaseResult]:
        steps: list[tuple[str, Callable[[], str]]] = [
            ("data", self.phase_data),
            ("sft", lambda: self.phase_stage("sft")),
            ("rm", lambda: self.phase_stage("rm")),
            ("rl", lambda: self.phase_stage("rl")),
            ("export", self.phase_export),
            ("serve", self.phase_serve),
            ("chat", self.phase_chat),
            ("compare", self.phase_compare),
        ]
        failed = False
        try:
            for name, body in steps:
                if failed:
                    self.results.append(PhaseResult(name, None, detail="skipped"))
                    continue
                failed = not self._run_phase(name, body)
        finally:
            self._run_phase("stop", self.phase_stop)
        return self.results

    @property
    def succeeded(self) -> bool:
        return bool(self.results) and all(result.ok for result in self.results)

    def _run_phase(self, name: str, body: Callable[[], str]) -> bool:
        self._phase_start = time.monotonic()
        self.report(DemoEvent("start", name))
        result = PhaseResult(name)
        try:
            # The last phase stops the demo's server: it runs whatever was asked.
            if name != "stop" and self.should_stop():
                raise PhaseFailed("stopped on request")
            result.metric = body()
            result.ok = True
        except Exception as error:  # noqa: BLE001 - a phase's failure is reported, the rest skipped
            result.ok = False
            result.detail = " ".join(str(error).split()) or type(error).__name__
        result.seconds = time.monotonic() - self._phase_start
        self.results.append(result)
        self.report(DemoEvent("end", name, result.metric or result.detail, result.seconds, result))
        return bool(result.ok)

    def progress(self, phase: str, text: str) -> None:
        self.report(DemoEvent("progress", phase, text, time.monotonic() - self._phase_start))

    # -- phases ----------------------------------------------------------------------------------
    def phase_data(self) -> str:
        stats = Stats()
        for tree in iter_trees(SAMPLE_FILE):
            stats.add(tree)
        return (f"{stats.trees} trees, {stats.sft_conversations} conversations, "
                f"{stats.rm_groups} ranked groups ({stats.rm_pairs} pairs), {len(stats.languages)} languages")

    def phase_stage(self, stage: str) -> str:
        from oatui.stages.launcher import LaunchRequest, launch

        configs = {"sft": self.options.sft_configs, "rm": self.options.rm_configs, "rl": self.options.rl_configs}[stage]
        overrides = list(self.options.overrides.get(stage, []))
        if stage == "rl":
            overrides = [f"sft_model={self.models['sft']}", f"rm_model={self.models['rm']}", *overrides]
        run = launch(LaunchRequest(stage=stage, configs=configs, overrides=overrides), self.workspace)
        self.progress(stage, f"run {run.id}")
        last_text = ""
        while True:
            info = refresh(run)
            if info.state not in ("queued", "running"):
                break
            if self.should_stop():
                stop_run(run)
            current = view(run)
            text = f"step {current.step}/{current.total_steps}" if current.total_steps else info.state
            metric = _headline(stage, current.last or {})
            if metric:
                text += f"  {metric}"
            if text != last_text:
                self.progress(stage, text)
                last_text = text
            time.sleep(1.0)
        if info.state != "succeeded":
            raise PhaseFailed(f"run {run.id} {info.state}: {info.error or 'see ' + str(run.log_path)}")
        self.models[stage] = run.final
        return _summary(stage, run.read_metrics())

    def phase_export(self) -> str:
        from oatui.serve.repository import export_model

        repo = self.workspace.triton_repo
        exported = [
            export_model("policy", self.models["rl"], repo, name="policy", force=True),
            export_model("policy", self.models["sft"], repo, name="policy-sft", force=True),
            export_model("rm", self.models["rm"], repo, name="rm", force=True),
        ]
        return ", ".join(result.name for result in exported) + f" in {repo}"

    def phase_serve(self) -> str:
        running = status(self.workspace)
        if running is not None:
            raise PhaseFailed(f"a server already runs for this workspace (gRPC {running.grpc_url}); stop it first")
        http, grpc, metrics = free_ports(3)
        options = ServerOptions(repo=str(self.workspace.triton_repo), http_port=http, grpc_port=grpc,
                                metrics_port=metrics, models=("policy", "policy-sft", "rm"))
        self.server = start_detached(self.workspace, options)
        return f"tritonserver ready on {self.server.grpc_url} (gRPC), pid {self.server.pid}"

    def _held_out(self) -> list[tuple[Any, ...]]:
        from oatui.config import load_stage_config
        from oatui.data.datasets import prompt_mix

        config = load_stage_config("rl", self.options.rl_configs, self.options.overrides.get("rl"), self.workspace.root)
        mix = prompt_mix(config.prompts or config.datasets, self.workspace.root, config.seed, config.val_fraction)
        if not mix.eval:
            raise PhaseFailed("the RL config holds out no prompts (val_fraction is 0)")
        return mix.eval[: self.options.held_out_prompts]

    def phase_chat(self) -> str:
        from oatui.serve.client import ChatClient

        prompt = self.options.chat_prompt or self._held_out()[0][-1].text
        self.report(DemoEvent("piece", "chat", f"> {prompt}\n"))
        pieces, first = 0, None
        started = time.monotonic()
        with ChatClient(self.server.grpc_url, "policy") as client:
            for piece in client.stream(prompt=prompt, max_new_tokens=self.options.max_new_tokens, seed=0):
                if first is None:
                    first = time.monotonic() - started
                pieces += 1
                self.report(DemoEvent("piece", "chat", piece))
        self.report(DemoEvent("piece", "chat", "\n"))
        if pieces == 0:
            raise PhaseFailed("the policy streamed nothing")
        return f"{pieces} pieces streamed, first after {1000 * (first or 0):.0f} ms"

    def phase_compare(self) -> str:
        """The SFT and RL policies judged on held-out prompts by the reward model (proxy) and the gold
        judge, greedy and sampled (``oatui eval`` in a child process: this one imports no torch)."""
        argv = [sys.executable, "-m", "oatui.cli", "eval", "--workspace", str(self.workspace.root),
                "--policy", str(self.models["rl"]), "--against", str(self.models["sft"]), "--rm", str(self.models["rm"]),
                "--prompts", str(self.options.held_out_prompts), "--max-new-tokens", str(self.options.max_new_tokens),
                "--json"]
        self.progress("compare", f"judging the SFT and RL policies on {self.options.held_out_prompts} held-out prompts")
        # Files, not pipes: a child that writes more than a pipe holds would wait for a reader forever.
        with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
            process = subprocess.Popen(argv, stdout=stdout, stderr=stderr, text=True, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
            try:
                while process.poll() is None:
                    if self.should_stop():
                        process.terminate()
                    time.sleep(0.2)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            stdout.seek(0)
            stderr.seek(0)
            out, err = stdout.read(), stderr.read()
        if process.returncode != 0:
            raise PhaseFailed((err.strip().splitlines() or [f"oatui eval exited {process.returncode}"])[-1])
        report = json.loads(out)
        self.comparison = report
        rl, sft = report["policies"]
        verdict = (f"{report['prompts']} held-out prompts, greedy and sampled: RM score SFT {sft['proxy']:.2f}, "
                   f"RL {rl['proxy']:.2f}; gold (0-3) SFT {_gold(sft['gold'])}, RL {_gold(rl['gold'])}")
        sampled = report.get("comparison", {}).get("sample") or {}
        if sampled.get("proxy_rise_half_spreads") is not None:
            verdict += (f"; sampled answers' RM score {sampled['proxy_rise']:+.2f}, "
                        f"{sampled['proxy_rise_half_spreads']:.2f} x half the SFT's spread")
        if sft["gold"] is None or rl["gold"] is None:
            raise PhaseFailed(verdict + " (the gold judge does not apply to these prompts)")
        if not rl["gold"] > sft["gold"]:
            raise PhaseFailed(verdict + " (the RL policy did not beat the SFT policy on gold)")
        return verdict

    def phase_stop(self) -> str:
        if self.server is None:
            return "no server was started"
        stopped = stop(self.workspace)
        self.server = None
        return "server stopped" if stopped else "server had already stopped"


def _gold(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _headline(stage: str, last: dict[str, Any]) -> str:
    for key in {"sft": ("train/loss", "eval/loss"), "rm": ("rm/accuracy", "train/loss"),
                "rl": ("ppo/score_mean", "ppo/kl")}[stage]:
        value = last.get(key)
        if isinstance(value, (int, float)):
            return f"{key} {value:.3f}"
    return ""


def _summary(stage: str, metrics: list[dict[str, Any]]) -> str:
    def series(key: str) -> list[float]:
        return [m[key] for m in metrics if isinstance(m.get(key), (int, float))]

    if stage == "sft":
        loss = series("train/loss")
        return f"loss {loss[0]:.2f} -> {loss[-1]:.2f}" if loss else "trained"
    if stage == "rm":
        accuracy = series("rm/accuracy")
        return f"held-out accuracy {accuracy[-1]:.3f}" if accuracy else "trained"
    score = series("ppo/score_mean")
    kl = series("ppo/kl")
    if not score:
        return "trained"
    fifth = max(1, len(score) // 5)
    text = f"RM score {statistics.mean(score[:fifth]):.2f} -> {statistics.mean(score[-fifth:]):.2f}"
    return text + (f", KL {kl[-1]:.1f}" if kl else "")


def format_summary(results: list[PhaseResult]) -> str:
    rows = [("phase", "result", "time", "key metric")]
    for result in results:
        state = {True: "ok", False: "FAILED", None: "skipped"}[result.ok]
        rows.append((result.name, state, f"{result.seconds:.1f} s", result.metric or result.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    total = sum(result.seconds for result in results)
    lines.append(f"total {total:.1f} s")
    return "\n".join(lines)
