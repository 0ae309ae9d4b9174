"""`oatui demo`: the whole flow on the tiny default, headless, with a progress line per phase."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from oatui.errors import UserError


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo",
        parents=parents,
        help="the whole flow on the tiny default: data, SFT, RM, RL, export, serve, chat, compare",
        description=(
            "Run the whole flow on the tiny default model, headless: the sample data, SFT, the reward "
            "model, PPO, export of the policies and the reward model, a tritonserver on free loopback "
            "ports, a streamed answer from the RL policy, and the reward model's scores of the SFT and "
            "RL policies' answers to held-out prompts judged by the reward model and by the gold judge (as "
            "'oatui eval'). Each stage is a normal run in the workspace. Exits 0 only if every phase "
            "succeeded and the RL policy beats the SFT policy on gold, not only on the reward model's score. "
            "About 3 minutes on 2 CPU cores. Ctrl-C stops it cleanly: the running stage saves a "
            "checkpoint and ends 'stopped', the server is stopped."
        ),
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE:KEY=VALUE",
                        help="a config override for one stage, e.g. rl:total_steps=20 (repeatable)")
    parser.add_argument("--prompts", type=int, default=96, help="held-out prompts to compare on (default 96)")
    parser.set_defaults(func=run)


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def run(args: argparse.Namespace) -> int:
    from oatui.demo import Demo, DemoEvent, DemoOptions, format_summary
    from oatui.workspace import Workspace

    overrides: dict[str, list[str]] = {}
    for option in args.overrides:
        stage, _, setting = option.partition(":")
        if stage not in ("sft", "rm", "rl") or "=" not in setting:
            raise UserError(f"--set {option}: expected STAGE:KEY=VALUE with STAGE sft, rm or rl")
        overrides.setdefault(stage, []).append(setting)
    if args.prompts < 1:
        raise UserError("--prompts: must be at least 1")
    workspace = Workspace.open(args.workspace)
    started = time.monotonic()
    last_progress = {"at": 0.0}

    def report(event: DemoEvent) -> None:
        clock = _elapsed(time.monotonic() - started)
        if event.kind == "start":
            print(f"[{clock}] {event.phase}: started", flush=True)
        elif event.kind == "progress":
            # One line every few seconds at most: a log a person can read.
            now = time.monotonic()
            if now - last_progress["at"] >= 5 or event.text.startswith("run "):
                print(f"[{clock}] {event.phase}: {event.text}", flush=True)
                last_progress["at"] = now
        elif event.kind == "piece":
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif event.result is not None:
            state = {True: "done", False: "FAILED", None: "skipped"}[event.result.ok]
            print(f"[{clock}] {event.phase}: {state} in {event.elapsed:.1f} s: {event.text}", flush=True)

    # Ctrl-C asks the demo to stop: the stage running saves a checkpoint and stops, the demo's
    # server is stopped. A second Ctrl-C leaves at once (runs and the server keep going).
    stop_requested = threading.Event()

    def interrupt(signum: int, frame: object) -> None:
        if stop_requested.is_set():
            raise KeyboardInterrupt
        stop_requested.set()
        print("\nstopping: the running stage saves a checkpoint and stops, then the server stops "
              "(Ctrl-C again to leave now)", file=sys.stderr, flush=True)

    print(f"oatui demo in {workspace.root}", flush=True)
    demo = Demo(workspace, report, DemoOptions(overrides=overrides, held_out_prompts=args.prompts),
                should_stop=stop_requested.is_set)
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        results = demo.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    print()
    print(format_summary(results))
    if stop_requested.is_set():
        return 130
    return 0 if demo.succeeded else 1
