"""`oatui eval`: judge a policy (and compare it with another) on held-out prompts, by the reward model and by gold."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from oatui.errors import UserError
from oatui.fsutil import expand_user

STAGES = ("sft", "rm", "rl")


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "eval",
        parents=parents,
        help="judge a policy on held-out prompts by the reward model (proxy) and the gold judge",
        description=(
            "Generate answers of a policy (and of a second one with --against) to held-out prompts, greedy and "
            "sampled at temperature 1, and judge them two ways: the reward model's score (the proxy the RL "
            "stage optimises) and, when the prompts are the shipped sample's, the sample's own rules (gold, "
            "0-3 points: a polite opener, the prompt's topic and no other, a closing sentence that ends the "
            "answer). Prints the proxy, gold and its parts, the share of answers that ended with EOS, the "
            "mean length, the win rate of the policy over the other by each judge, and how far its RM score "
            "is above the other's, also in units of half the spread of the other's scores. A policy that "
            "raises the proxy while gold falls is over-optimising the reward model."
        ),
        epilog=(
            "RUN_OR_DIR is a run id in the workspace (its final/ model), 'sft', 'rm' or 'rl' for the newest "
            "succeeded run of that stage, or a model folder. Example: oatui eval --policy rl --against sft"
        ),
    )
    parser.add_argument("--policy", required=True, metavar="RUN_OR_DIR", help="the policy to judge")
    parser.add_argument("--against", metavar="RUN_OR_DIR", help="a second policy to compare with (e.g. sft)")
    parser.add_argument("--rm", default="rm", metavar="RUN_OR_DIR",
                        help="the reward model that gives the proxy score (default: the newest succeeded RM run)")
    parser.add_argument("--prompts", type=int, default=96, metavar="N",
                        help="how many held-out prompts (default 96)")
    parser.add_argument("--data", metavar="FILE",
                        help="take the prompts from an export file or a JSONL of {\"prompt\": ...} instead of the "
                             "sample's held-out questions (gold then applies only to questions in the sample's style)")
    parser.add_argument("--decoding", choices=("greedy", "sample", "both"), default="both",
                        help="greedy, sampled at temperature 1 (seeded), or both (default)")
    parser.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="longest answer (default 48)")
    parser.add_argument("--samples", type=int, default=4, metavar="N",
                        help="sampled answers per prompt (default 4): the sampled numbers are means over all of "
                             "them, steadier than over one answer each")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled answers (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=run)


def resolve_model(value: str, runs_dir: Path, option: str) -> Path:
    """A run id, a stage name (its newest succeeded run) or a folder, as a loadable model folder."""
    from oatui.stages.runs import latest_final

    if value in STAGES:
        final = latest_final(runs_dir, value)
        if final is None:
            raise UserError(f"{option} {value}: no succeeded {value} run in {runs_dir.parent}")
        return final
    run_dir = runs_dir / value
    if "/" not in value and value not in (".", "..") and run_dir.is_dir():
        final = run_dir / "final"
        if not (final / "config.json").is_file():
            raise UserError(f"{option} {value}: the run has no final model (did it succeed?)")
        return final
    path = expand_user(value)
    if (path / "config.json").is_file():
        return path
    raise UserError(f"{option} {value}: not a run of this workspace, a stage name (sft, rm, rl) or a model folder")


def _contexts(args: argparse.Namespace, workspace: Any) -> list[Any]:
    from oatui.data.rules import Turn

    if args.data is None:
        from oatui.data.sample import held_out_prompts

        prompts = held_out_prompts(args.prompts)
        return [(Turn("prompter", prompt),) for prompt in prompts]
    from oatui.config import DatasetSpec
    from oatui.data.datasets import prompt_mix

    mix = prompt_mix([DatasetSpec(path=args.data)], workspace.root, args.seed, 0.0)
    if not mix.train:
        raise UserError(f"--data {args.data}: no prompts")
    return mix.train[: args.prompts]


def run(args: argparse.Namespace) -> int:
    from oatui.workspace import Workspace

    if args.prompts < 1:
        raise UserError("--prompts: must be at least 1")
    if args.samples < 1:
        raise UserError("--samples: must be at least 1")
    if not 1 <= args.max_new_tokens <= 4096:
        raise UserError("--max-new-tokens: must be between 1 and 4096")
    workspace = Workspace.open(args.workspace)
    runs_dir = workspace.root / "runs"
    policy = resolve_model(args.policy, runs_dir, "--policy")
    against = resolve_model(args.against, runs_dir, "--against") if args.against else None
    reward_model = resolve_model(args.rm, runs_dir, "--rm")
    contexts = _contexts(args, workspace)
    decodings = ("greedy", "sample") if args.decoding == "both" else (args.decoding,)
    policies = [(_label(args.policy, policy), str(policy))]
    if against is not None:
        policies.append((_label(args.against, against), str(against)))

    import torch

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    from oatui.train.evaluate import (answers_per_context, averaged, comparison, evaluate_policies, load_scorer,
                                      rm_feature_accuracy)

    total = len(contexts) * sum(answers_per_context(decoding, args.samples) for decoding in decodings) * len(policies)
    bar = _Progress(total, enabled=not args.json or sys.stderr.isatty())
    scorer = load_scorer(str(reward_model))
    results = evaluate_policies(policies, scorer, contexts, decodings=decodings,
                                max_new_tokens=args.max_new_tokens, seed=args.seed, samples=args.samples,
                                progress=lambda what, count: bar.advance(what, count))
    bar.close()
    report: dict[str, Any] = {
        "prompts": len(contexts),
        "samples": args.samples,
        "reward_model": str(reward_model),
        # What the reward model has learnt of each of the sample's rules on its own (sample prompts only).
        "reward_model_rules": None if args.data else rm_feature_accuracy(scorer, [c[-1].text for c in contexts], args.seed),
        "policies": [
            {"name": result.name, "path": result.path,
             "results": [judged.summary() for judged in result.judged.values()],
             "proxy": averaged(result, "proxy"), "gold": averaged(result, "gold")}
            for result in results
        ],
    }
    if len(results) == 2:
        report["comparison"] = comparison(results[0], results[1])
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(format_report(report))
    return 0


def _label(value: str, path: Path) -> str:
    if value in STAGES:
        return f"{value} ({path.parent.name})"
    return path.parent.name if path.name == "final" else str(path)


def _number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    rows = [("policy", "decoding", "proxy", "gold", "polite", "on topic", "ending", "EOS", "length")]
    for policy in report["policies"]:
        for summary in policy["results"]:
            rows.append((policy["name"], summary["decoding"], _number(summary["proxy"]), _number(summary["gold"]),
                         _number(summary["polite"]), _number(summary["on_topic"]), _number(summary["proper_ending"]),
                         _number(summary["eos_fraction"]), _number(summary["mean_length"], 1)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip()
             for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    sampled = any(summary["decoding"] == "sample" for policy in report["policies"] for summary in policy["results"])
    samples = report["samples"] if sampled else 1
    lines.append(f"{report['prompts']} held-out prompts" + (f", {samples} sampled answers each" if samples > 1 else "")
                 + "; gold is 0-3 (the sample's rules), '-' where they do not apply")
    rules = report.get("reward_model_rules")
    if rules:
        lines.append("reward model on held-out reply pairs that differ in one rule only: "
                     + ", ".join(f"{name.replace('_', ' ')} {_number(value)}" for name, value in rules.items()))
    if "comparison" in report:
        first, second = report["policies"][0]["name"], report["policies"][1]["name"]
        for decoding, rates in report["comparison"].items():
            line = (f"{first} over {second} ({decoding}): win rate by RM {_number(rates['win_rate_proxy'])}, "
                    f"by gold {_number(rates['win_rate_gold'])}")
            if rates.get("proxy_rise") is not None:
                line += f"; RM score {rates['proxy_rise']:+.2f}"
                if rates.get("proxy_rise_half_spreads") is not None:
                    line += f" ({rates['proxy_rise_half_spreads']:.2f} x half the spread of the other's)"
            lines.append(line)
    return "\n".join(lines)


class _Progress:
    """A one-line progress bar on stderr (a terminal only): what is being answered, and how far."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled and sys.stderr.isatty()

    def advance(self, what: str, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / max(1, self.total))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} answers  {what:<28}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()
