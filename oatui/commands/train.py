"""`oatui train sft|rm|rl`: start one stage as a run in the workspace."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from oatui.errors import UserError

EXAMPLES = """examples:
  oatui train sft --configs defaults tiny
  oatui train rm --configs defaults_rm tiny_rm --detach
  oatui train rl --configs defaults_rl tiny_rl --set total_steps=20
  oatui train sft --configs defaults pythia-1.4b --launcher deepspeed --gpus 0,1,2,3
  oatui train sft --configs defaults pythia-12b --launcher deepspeed --hostfile hosts.txt
  oatui train sft --resume sft-20261124-101500-ab12
  oatui train sft --configs defaults tiny --detach
  oatui train rm --configs defaults_rm tiny_rm --after sft --detach
  oatui train rl --configs defaults_rl tiny_rl --after rm --detach
  oatui train sft --list-keys
  oatui train rl --configs defaults_rl tiny_rl --set total_steps=20 --print-config
"""


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "train",
        parents=parents,
        help="run a stage (sft, rm, rl) as a run in the workspace",
        description=(
            "Run one stage of the flow as a run in WORKSPACE/runs/. The stage runs under a supervisor "
            "in its own session, so it survives the terminal; without --detach this command follows "
            "its log until it ends, and Ctrl-C asks it to stop (it saves a checkpoint first)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=("sft", "rm", "rl"), help="which stage")
    parser.add_argument("--configs", nargs="+", default=[], metavar="NAME",
                        help="config sections, applied in order (later keys win); see configs/*.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable); the value is read as YAML")
    parser.add_argument("--launcher", default="auto", choices=("auto", "python", "accelerate", "deepspeed"),
                        help="auto: deepspeed when the config names a deepspeed config or a hostfile is given, "
                             "accelerate for several processes, else plain python")
    parser.add_argument("--gpus", metavar="LIST", help="GPU indices to use, e.g. 0,1 (default: what the launcher sees)")
    parser.add_argument("--num-processes", type=int, metavar="N",
                        help="processes (ranks) to start; default: one per GPU in --gpus, else 1")
    parser.add_argument("--hostfile", metavar="FILE",
                        help="multi-node: a deepspeed hostfile ('HOST slots=N' per line)")
    parser.add_argument("--detach", action="store_true", help="print the run id and return at once")
    parser.add_argument("--resume", metavar="RUN_ID",
                        help="continue a stopped or failed run from its newest complete checkpoint")
    parser.add_argument("--after", metavar="RUN",
                        help="queue this run to start when RUN succeeds (a run id, or sft/rm/rl for the "
                             "newest run of that stage, queued or running ones included); if RUN fails "
                             "or is stopped, this run ends failed without starting, and so do the runs "
                             "queued after it. 'latest' models are resolved when the run starts")
    parser.add_argument("--list-keys", action="store_true",
                        help="print every config key of the stage with the default its defaults section "
                             "resolves to, and exit")
    parser.add_argument("--json", action="store_true",
                        help="with --list-keys: a JSON list of {key, type, default, help}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config that --configs and --set resolve to, as YAML, and exit "
                             "(no run is made)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oatui.stages.launcher import LaunchRequest, launch
    from oatui.workspace import Workspace

    if args.json and not args.list_keys:
        raise UserError("--json goes with --list-keys")
    if args.list_keys or args.print_config:
        return describe(args)
    workspace = Workspace.open(args.workspace)
    request = LaunchRequest(
        stage=args.stage,
        configs=args.configs,
        overrides=args.overrides,
        launcher=args.launcher,
        gpus=args.gpus,
        num_processes=args.num_processes,
        hostfile=args.hostfile,
        resume=args.resume,
        after=args.after,
    )
    log_start = 0
    if args.resume:
        from oatui.stages.runs import find_run

        log = find_run(workspace.runs, args.resume).log_path
        log_start = log.stat().st_size if log.exists() else 0  # follow the new attempt only
    run_dir = launch(request, workspace)
    if args.detach:
        print(run_dir.id)
        return 0
    print(f"run {run_dir.id} ({run_dir.path})", file=sys.stderr)
    return follow(run_dir, log_start)


def describe(args: argparse.Namespace) -> int:
    """``--list-keys`` and ``--print-config``: read the config sections, print, make nothing."""
    from oatui.config import describe_keys, load_stage_config, to_yaml
    from oatui.workspace import Workspace

    if args.list_keys and args.print_config:
        raise UserError("--list-keys and --print-config: choose one")
    if args.resume:
        raise UserError(f"--{'list-keys' if args.list_keys else 'print-config'} does not go with --resume "
                        f"(the run's resolved config is its config.yaml)")
    root = Workspace.open(args.workspace, create=False).root
    if args.print_config:
        sys.stdout.write(to_yaml(load_stage_config(args.stage, args.configs, args.overrides, root)))
        return 0
    rows = describe_keys(args.stage, root)
    if args.json:
        print(json.dumps([vars(row) for row in rows], indent=1, ensure_ascii=False))
        return 0
    for row in rows:
        default = "" if row.type.endswith(", required") else f"default {_brief(row.key, row.default)}"
        print(f"{row.key:28} {row.type:32} {default}".rstrip())
        if row.help:
            print(f"{'':28} {row.help}")
    return 0


def _brief(key: str, value: object) -> str:
    """A default as one short line; a ``datasets`` entry shows only what differs from an entry's defaults."""
    if key == "datasets" and isinstance(value, list):
        from oatui.config import DatasetSpec

        value = [DatasetSpec.model_validate(entry).model_dump(mode="json", exclude_defaults=True) for entry in value]
    return json.dumps(value, ensure_ascii=False)


def follow(run_dir, position: int = 0) -> int:  # noqa: ANN001
    """Print the run's log from ``position`` as it grows until the run ends; Ctrl-C asks it to stop."""
    from oatui.stages.runs import refresh, stop_run

    interrupted = {"count": 0}

    def on_interrupt(signum: int, frame: object) -> None:
        interrupted["count"] += 1
        try:
            if interrupted["count"] == 1:
                print("\nstopping at the next step boundary (Ctrl-C again to kill)", file=sys.stderr)
                stop_run(run_dir)
            else:
                stop_run(run_dir, force=True)
        except UserError:
            pass

    previous = signal.signal(signal.SIGINT, on_interrupt)
    # A dropped terminal ends this follower only; the run goes on under its supervisor.
    try:
        while True:
            position = _print_new(run_dir.log_path, position)
            info = refresh(run_dir)
            if info.state not in ("queued", "running"):
                time.sleep(0.2)
                _print_new(run_dir.log_path, position)
                break
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, previous)
    return summarize(run_dir, info)


def _print_new(path, position: int) -> int:  # noqa: ANN001
    try:
        with open(path, "rb") as handle:
            handle.seek(position)
            data = handle.read()
    except FileNotFoundError:
        return position
    if data:
        sys.stdout.write(data.decode("utf-8", "replace"))
        sys.stdout.flush()
    return position + len(data)


def summarize(run_dir, info) -> int:  # noqa: ANN001

    if info.state == "succeeded":
        print(f"run {info.id} succeeded; model: {run_dir.final}", file=sys.stderr)
        return 0
    if info.state == "stopped":
        print(f"run {info.id} stopped; resume with: oatui train {info.stage} --resume {info.id}", file=sys.stderr)
        return 130
    if info.exit_code == 2 and info.error:
        raise UserError(info.error)
    print(f"run {info.id} failed: {info.error or 'see ' + str(run_dir.log_path)}", file=sys.stderr)
    return 1
