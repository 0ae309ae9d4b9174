"""`oatui runs`: list, follow and stop the runs of a workspace."""

from __future__ import annotations

import argparse
import json
import sys
import time

from oatui.commands.train import _print_new
from oatui.fsutil import tail_lines


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "runs",
        parents=parents,
        help="list, follow and stop runs",
        description="List the runs of the workspace (newest first), follow one's log, or stop one.",
    )
    parser.add_argument("--json", action="store_true", help="a JSON list of runs instead of a table")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    tail = actions.add_parser("tail", parents=parents, help="print a run's log; -f follows it until the run ends")
    tail.add_argument("run_id", metavar="RUN")
    tail.add_argument("-n", "--lines", type=int, default=40, help="lines from the end to start with (default 40)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    stop = actions.add_parser("stop", parents=parents, help="ask a run to stop: it saves a checkpoint, then ends as 'stopped'")
    stop.add_argument("run_id", metavar="RUN")
    stop.add_argument("--force", action="store_true", help="kill at once (no checkpoint)")
    stop.add_argument("--wait", action="store_true", help="return only when the run has ended")
    show = actions.add_parser("show", parents=parents, help="a run's run.json and last metrics")
    show.add_argument("run_id", metavar="RUN")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oatui.stages.runs import find_run, format_clock, list_runs, stop_run, view, wait_for_end
    from oatui.workspace import Workspace

    workspace = Workspace.open(args.workspace)
    if args.action is None:
        views = list_runs(workspace.runs)
        if args.json:
            print(json.dumps([v.to_dict() for v in views], indent=2))
            return 0
        if not views:
            print(f"no runs in {workspace.runs}")
            return 0
        print(f"{'RUN':32} {'STAGE':5} {'STATE':9} {'STEP':>11} {'ELAPSED':>8} {'ETA':>8}  NOTE")
        for v in views:
            steps = f"{v.step}/{v.total_steps}" if v.total_steps else "-"
            note = (v.info.error if v.info and v.info.error else v.problem) or ""
            if not note and v.state == "queued" and v.info and v.info.after:
                note = f"after {v.info.after}"
            print(f"{v.id:32} {v.stage:5} {v.state:9} {steps:>11} {format_clock(v.elapsed):>8} {format_clock(v.eta):>8}  {note[:80]}")
        return 0
    run_dir = find_run(workspace.runs, args.run_id)
    if args.action == "show":
        current = view(run_dir)
        print(json.dumps({**current.to_dict(), "last_metrics": current.last}, indent=2))
        return 0
    if args.action == "stop":
        stop_run(run_dir, force=args.force)
        print(f"stop requested for {run_dir.id}", file=sys.stderr)
        if args.wait:
            info = wait_for_end(run_dir)
            print(f"{run_dir.id}: {info.state}", file=sys.stderr)
        return 0
    if args.action == "tail":
        for line in tail_lines(run_dir.log_path, max(0, args.lines)):
            print(line)
        if args.follow:
            from oatui.stages.runs import refresh

            position = run_dir.log_path.stat().st_size if run_dir.log_path.exists() else 0
            while True:
                position = _print_new(run_dir.log_path, position)
                if refresh(run_dir).state not in ("queued", "running"):
                    _print_new(run_dir.log_path, position)
                    break
                time.sleep(0.5)
        return 0
    return 0
