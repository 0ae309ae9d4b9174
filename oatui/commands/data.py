"""`oatui data`: look at export files."""

from __future__ import annotations

import argparse
import json
import sys

from oatui.errors import UserError


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("data", parents=parents, help="inspect Open-Assistant export files",
                            description="Inspect Open-Assistant export files (JSONL, one message tree per line, optionally gzipped).")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser), required=True)
    stats = actions.add_parser(
        "stats", parents=parents,
        help="count trees, messages, SFT conversations, RM groups and pairs, per language",
        description=(
            "Count what the stages would use: trees in the file (trees_total) and used (ready_for_export, "
            "prompt neither deleted nor rejected, in one of the --lang languages), usable messages, distinct "
            "SFT conversations, RM groups and their (better, worse) pairs, and usable messages per language."
        ),
    )
    stats.add_argument("--trees", required=True, metavar="FILE", help="export file (.jsonl or .jsonl.gz), 'sample' (the shipped sample), or 'feedback' (the "
                            "workspace's rankings from the chat, data/feedback.trees.jsonl), as in a config's datasets")
    stats.add_argument("--json", action="store_true", help="one JSON object with exactly the counted keys")
    stats.add_argument("--skip-invalid", action="store_true", help="count and skip malformed lines instead of stopping")
    stats.add_argument("--lang", metavar="CODES", type=_language_codes,
                       help="use only the trees whose prompt is in one of these languages, e.g. en,de "
                            "(a dataset entry's lang; messages inside a used tree keep any language)")
    parser.set_defaults(func=run)


def _language_codes(text: str) -> list[str]:
    codes = [code.strip() for code in text.split(",")]
    if not all(codes):
        raise argparse.ArgumentTypeError(f"expected language codes separated by commas, such as en,de, got {text!r}")
    return codes


def run(args: argparse.Namespace) -> int:
    from oatui.data.rules import Stats
    from oatui.data.trees import LoadReport, iter_trees

    path = args.trees
    if path == "sample":
        from oatui.data.sample import SAMPLE_FILE

        path = SAMPLE_FILE
    elif path == "feedback":
        from oatui.workspace import FEEDBACK_FILE, Workspace

        path = Workspace.open(args.workspace, create=False).root / FEEDBACK_FILE
        if not path.is_file():
            raise UserError(f"--trees feedback: no such file ({path}); rank answers in the chat (ctrl+r) "
                            "or A/B (ctrl+g) to write it")
    report = LoadReport()
    stats = Stats(lang=args.lang)
    for tree in iter_trees(path, skip_invalid=args.skip_invalid, report=report):
        stats.add(tree)
    if report.skipped:
        first_line, first_problem = report.skipped[0]
        print(f"{path}: skipped {len(report.skipped)} invalid lines (first: line {first_line}: {first_problem})", file=sys.stderr)
    counts = stats.to_dict()
    if args.json:
        print(json.dumps(counts, ensure_ascii=False))
        return 0
    width = max(len(k) for k in counts)
    for key, value in counts.items():
        if key == "languages":
            continue
        print(f"{key:{width}}  {value}")
    print(f"{'languages':{width}}  " + (", ".join(f"{lang} {n}" for lang, n in counts["languages"].items()) or "-"))
    return 0
