"""Benchmark: the RM stage with rm_loss pairwise (trl's RewardTrainer) and kwise (Open-Assistant's RMLoss).

Runs the real command, ``oatui train rm --configs defaults_rm tiny_rm --set rm_loss=...``, once per
loss (``--repeats`` times, alternating the order) in one scratch workspace (after ``oatui train sft --configs defaults tiny`` when the RM starts from the
newest SFT model, ``model_name: latest-sft``, as ``tiny_rm`` does), then scores the held-out
ranked groups of that config (the same groups for both) with each final model, every reply once, and
prints a table: the stage's own ``rm/accuracy`` (held-out pair accuracy, as it logs it), the pair
accuracy and top-1 group accuracy (a best-ranked reply scores highest in its group) recomputed the
same way for both models, the sequences encoded per epoch, and the Trainer's ``train_runtime``
divided by the run's epochs.

    python bench/bench_rm_loss.py
    python bench/bench_rm_loss.py --repeats 2 --configs defaults_rm tiny_rm --set num_train_epochs=2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LOSSES = ("pairwise", "kwise")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_stage(workspace: Path, configs: list[str], overrides: list[str], loss: str) -> Path:
    """One ``oatui train rm`` run to the end; its run folder."""
    oatui = str(Path(sys.executable).parent / "oatui")
    argv = [oatui, "train", "rm", "--configs", *configs, "--workspace", str(workspace), "--detach"]
    for option in [*overrides, f"rm_loss={loss}"]:
        argv += ["--set", option]
    run_id = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    run = workspace / "runs" / run_id
    # Wait for the detached run (its supervisor writes the final state into run.json).
    follow = subprocess.run([oatui, "runs", "tail", run_id, "-f", "--workspace", str(workspace)],
                            capture_output=True, text=True)
    state = json.loads((run / "run.json").read_text())
    if state.get("state") != "succeeded":
        sys.exit(f"{loss}: the run ended {state.get('state')}: {follow.stdout[-2000:]}")
    return run


def metrics_of(run: Path) -> dict[str, float]:
    """The last value of every metric in the run's metrics.jsonl."""
    last: dict[str, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        last.update({key: value for key, value in record.items() if isinstance(value, (int, float))})
    return last


def held_out_groups(configs: list[str], overrides: list[str], workspace: Path):
    from oatui.config import load_stage_config
    from oatui.data.datasets import rm_mix

    config = load_stage_config("rm", configs, overrides, workspace)
    return config, rm_mix(config.datasets, workspace, config.seed, config.val_fraction, config.skip_invalid).eval


def group_accuracies(final: Path, groups, max_length: int, max_replies: int) -> tuple[float, float, int, int]:
    """(pair accuracy, top-1 accuracy, pairs, groups) of a reward model on ranked groups, each reply scored once."""
    from oatui.data.datasets import rm_text
    from oatui.models.loading import load_for_inference
    from oatui.models.scoring import score_texts

    model, tokenizer = load_for_inference(str(final), "rm")
    correct = pairs = top1 = counted = 0
    for group in groups:
        replies, ranks = group.replies[:max_replies], group.ranks[:max_replies]
        if len(set(ranks)) < 2:
            continue
        scores = score_texts(model, tokenizer, [rm_text(group.context, reply, tokenizer.eos_token) for reply in replies],
                             max_length=max_length)
        for i in range(len(replies)):
            for j in range(i + 1, len(replies)):
                if ranks[i] != ranks[j]:
                    better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
                    pairs += 1
                    correct += scores[better] > scores[worse]
        best = min(ranks)
        counted += 1
        top1 += max(s for s, r in zip(scores, ranks) if r == best) > max(s for s, r in zip(scores, ranks) if r != best)
    return correct / pairs, top1 / counted, pairs, counted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["defaults_rm", "tiny_rm"], help="config sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both runs (repeatable)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per loss, alternating which goes first")
    parser.add_argument("--workspace", type=Path, help="scratch workspace (default: a temporary folder)")
    parser.add_argument("--sft-configs", nargs="+", default=["defaults", "tiny"],
                        help="sections of the SFT run made first when the RM config's model_name is latest-sft")
    args = parser.parse_args(argv)

    scratch = None
    workspace = args.workspace
    if workspace is None:
        scratch = tempfile.TemporaryDirectory(prefix="bench-rm-loss-")
        workspace = Path(scratch.name) / "ws"
    workspace.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(workspace, 0o700)

    from oatui.config import load_stage_config

    if load_stage_config("rm", args.configs, args.overrides, workspace).model_name == "latest-sft":
        print(f"training: sft --configs {' '.join(args.sft_configs)} (the reward models start from it)",
              file=sys.stderr, flush=True)
        oatui = str(Path(sys.executable).parent / "oatui")
        subprocess.run([oatui, "train", "sft", "--configs", *args.sft_configs, "--workspace", str(workspace)],
                       check=True, capture_output=True, text=True)

    runs: dict[str, list[Path]] = {loss: [] for loss in LOSSES}
    for repeat in range(args.repeats):
        for loss in (LOSSES if repeat % 2 == 0 else LOSSES[::-1]):
            print(f"training: rm_loss={loss} (repeat {repeat + 1})", file=sys.stderr, flush=True)
            runs[loss].append(run_stage(workspace, args.configs, args.overrides, loss))

    import torch

    config, groups = held_out_groups(args.configs, args.overrides, workspace)
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, "
          f"{'GPU' if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"command: oatui train rm --configs {' '.join(args.configs)}"
          + "".join(f" --set {o}" for o in args.overrides) + " --set rm_loss=pairwise|kwise")
    print(f"held out: {len(groups)} ranked groups\n")
    header = ("rm_loss", "stage rm/accuracy", "pair acc.", "top-1 acc.", "sequences/epoch", "seconds/epoch")
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for loss in LOSSES:
        stage_accuracy, pair_accuracy, top1_accuracy, seconds = [], [], [], []
        sequences = 0
        for run in runs[loss]:
            metrics = metrics_of(run)
            stage_accuracy.append(metrics["rm/accuracy"])
            seconds.append(metrics["train/runtime"] / config.num_train_epochs)
            pairs_acc, top1_acc, _, _ = group_accuracies(run / "final", groups, config.max_length, config.max_replies)
            pair_accuracy.append(pairs_acc)
            top1_accuracy.append(top1_acc)
            train_pairs = metrics.get("data/train_pairs", 0)
            # pairwise encodes both replies of every pair; kwise every reply of every group once
            sequences = int(2 * train_pairs) if loss == "pairwise" else int(metrics.get("data/train_replies", 0))
        print(f"| {loss} | {statistics.median(stage_accuracy):.3f} | {statistics.median(pair_accuracy):.3f} | "
              f"{statistics.median(top1_accuracy):.3f} | {sequences or '-'} | "
              + " / ".join(f"{s:.1f}" for s in seconds) + " |")
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
