"""`oatui` / `oatui app`: the Textual workstation on the workspace."""

from __future__ import annotations

import argparse

DEFAULT_REFRESH = 1.0

DESCRIPTION = """\
Open the workstation: every GPU and the host, the runs of the workspace with their logs and
curves, launch forms for SFT, RM and RL, the Triton server, and a chat pane on the served policy.
Runs and the server are detached: quitting (q) or losing the SSH session leaves them running.
--replay drives the GPU panel from a recording ('oatui gpus --json --watch > FILE'), for demos.
"""


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "app",
        parents=parents,
        help="the workstation (also what 'oatui' alone opens)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--replay",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="drive the GPU panel from a recording instead of this machine's GPUs",
    )
    parser.add_argument(
        "--refresh",
        type=float,
        default=DEFAULT_REFRESH,
        metavar="S",
        help=f"seconds between two reads of the GPUs and the runs (default {DEFAULT_REFRESH:g})",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oatui.app.app import make_app

    app = make_app(args.workspace, replay=getattr(args, "replay", None),
                   refresh=getattr(args, "refresh", DEFAULT_REFRESH))
    app.run()
    return int(app.return_code or 0)


def defaults() -> argparse.Namespace:
    """The options of `oatui app` when `oatui` is run with no command."""
    return argparse.Namespace(refresh=DEFAULT_REFRESH)
