"""`oatui gpus`: every GPU and the host, once or as a stream; JSON lines make a recording."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "gpus",
        parents=parents,
        help="every GPU and the host: a table, or JSON lines that make a recording",
        description=(
            "Show every NVIDIA GPU (utilization, memory, temperature, power, fan, clocks, PCIe, "
            "MIG devices, processes) and the host (CPU, load, memory, swap, the workspace's disk). "
            "Without an NVIDIA driver it says so once and shows the host."
        ),
        epilog=(
            "Recording: 'oatui gpus --json --watch > session.jsonl' writes one snapshot per line; "
            "'oatui gpus --replay session.jsonl' (or 'oatui --replay session.jsonl' for the app) "
            "plays it back, looping, with times set to now. With --json, notices go to stderr so "
            "that stdout stays a clean recording."
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per snapshot, one per line"
    )
    parser.add_argument(
        "--watch", action="store_true", help="repeat every --interval seconds until Ctrl-C"
    )
    parser.add_argument(
        "--interval",
        type=_interval,
        default=1.0,
        metavar="S",
        help="seconds between snapshots with --watch (default: 1.0)",
    )
    parser.add_argument(
        "--count",
        type=_count,
        default=None,
        metavar="N",
        help="stop after N snapshots (implies --watch)",
    )
    parser.add_argument(
        "--replay",
        # Suppressed, so that `oatui --replay FILE gpus` (the top-level option) works as well.
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="read snapshots from a recording instead of this machine",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oatui.monitor.sampler import make_source, snapshot_to_line
    from oatui.monitor.text import format_snapshot, printable
    from oatui.workspace import Workspace

    # Monitoring is no reason to create a workspace: only its path is needed (for disk usage).
    workspace = Workspace.open(args.workspace, create=False).root
    replay = getattr(args, "replay", None)
    source = make_source(Path(replay) if replay else None, workspace)
    total = args.count if args.count is not None else (None if args.watch else 1)
    interactive = sys.stdout.isatty() and not args.json
    said_notice: str | None = None
    shown = 0
    deadline: float | None = None
    try:
        while True:
            snapshot = source.sample()
            if deadline is None:
                deadline = time.monotonic()  # the schedule starts when the first one is taken
            if args.json:
                if snapshot.notice and snapshot.notice != said_notice:
                    print(f"oatui gpus: {printable(snapshot.notice)}", file=sys.stderr, flush=True)
                sys.stdout.write(snapshot_to_line(snapshot) + "\n")
            else:
                width = shutil.get_terminal_size().columns if interactive else None
                # A terminal gets the notice on every redrawn screen; a pipe only when it changes.
                text = format_snapshot(
                    snapshot, width=width, notice=interactive or snapshot.notice != said_notice
                )
                if interactive and total != 1:
                    sys.stdout.write("\x1b[H\x1b[2J")
                elif shown:
                    sys.stdout.write("\n")
                sys.stdout.write(text + "\n")
            sys.stdout.flush()
            said_notice = snapshot.notice
            shown += 1
            if total is not None and shown >= total:
                return 0
            # Keep to the schedule whatever a sample took, without a burst to catch up after a
            # stall (a suspended laptop, a stopped process).
            deadline = max(deadline + args.interval, time.monotonic())
            time.sleep(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        return 0
    finally:
        source.close()
