"""The ``oatui`` command: parse the arguments, then hand over to the package that does the work.

Each command lives in ``oatui/commands/NAME.py`` with ``register(subparsers, parents)`` and a
``run(args)``; those modules import nothing heavy at module level, so ``oatui --help`` and the
app start fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from oatui import __version__
from oatui.commands import app as app_command
from oatui.errors import EXIT_USAGE, UserError
from oatui.fsutil import UnreadableFile

COMMANDS = ("app", "data", "train", "runs", "eval", "export", "serve", "chat", "gpus", "demo")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--workspace",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="workspace folder (default: $OATUI_WORKSPACE, else ./workspace)",
    )
    return common


def build_parser() -> Parser:
    common = _common()
    parser = Parser(
        prog="oatui",
        parents=[common],
        description=(
            "A terminal workstation for Open-Assistant style RLHF. With no command, opens the app "
            "on the workspace."
        ),
        epilog="Run 'oatui COMMAND --help' for the options of each command.",
    )
    parser.add_argument(
        "--replay",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="open the app with the GPU panel driven by a recording from 'oatui gpus --json --watch'",
    )

    parser.add_argument("--version", action="version", version=f"oatui {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"oatui.commands.{name}")
        module.register(sub, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)  # everything oatui writes in the workspace is private to its user
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "workspace"):
        args.workspace = None
    if args.command is None:
        args.command = "app"

        args.func = app_command.run
        for key, value in vars(app_command.defaults()).items():
            if not hasattr(args, key):
                setattr(args, key, value)
    try:
        code = args.func(args)
    except UserError as error:
        print(f"oatui {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except UnreadableFile as error:
        # A file read back (a state file, a checkpoint's JSON) that a reader did not expect to fail.
        print(f"oatui {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError) as error:
        # The filesystem said no (a folder made read-only, a path that is a file): one line naming it.
        where = error.filename if error.filename is not None else "a file"
        print(f"oatui {args.command}: error: {where}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    except RecursionError:
        print(f"oatui {args.command}: error: an input is nested too deep to read", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print(f"oatui {args.command}: error: out of memory reading the input (a file too large for this "
              "machine's memory limit?)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `oatui runs --json | head`: the reader left; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
