"""`oatui app`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("app", parents=parents, help="(not built yet)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("oatui app: not built yet")


def defaults() -> argparse.Namespace:
    return argparse.Namespace()
