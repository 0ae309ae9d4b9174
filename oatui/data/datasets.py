"""From the config's ``datasets`` list to SFT, RM and prompt examples, with held-out splits.

Each entry names an export file (or ``sample`` / ``feedback``) and a ``fraction``: the examples of
that file are taken in a seeded order, cut to the fraction (or repeated, above 1), then capped by
``max_examples``. Held-out examples are chosen by a seeded hash of the tree (SFT) or the ranked
group (RM), so a split never changes when other files join the mix.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from oatui.config import DatasetSpec
from oatui.data.format import format_conversation, segments, tokenize_with_mask
from oatui.data.rules import Conversation, RankedGroup, Turn, rm_groups, sft_conversations, tree_is_used
from oatui.data.trees import LoadReport, MessageTree, iter_trees
from oatui.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


def resolve_dataset_path(spec: DatasetSpec, workspace: Path) -> Path | None:
    """The file behind a dataset entry; None for an optional one that does not exist yet."""
    if spec.path == "sample":
        from oatui.data.sample import SAMPLE_FILE

        return SAMPLE_FILE
    if spec.path == "feedback":
        path = workspace / "data" / "feedback.trees.jsonl"
    else:
        path = Path(spec.path).expanduser()
        if not path.is_absolute():
            path = workspace / path
    if not path.exists():
        if spec.optional:
            return None
        raise UserError(f"datasets: {spec.path}: no such file ({path})")
    return path


@dataclass
class SourceCount:
    path: str
    trees: int = 0
    examples: int = 0
    used: int = 0
    units: int = 0
    """What the used examples amount to for training (pairs, for RM groups)."""
    skipped_lines: int = 0


@dataclass
class Mix:
    """Examples of one kind drawn from several files, with per-file counts for the log."""

    train: list[Any] = field(default_factory=list)
    eval: list[Any] = field(default_factory=list)
    sources: list[SourceCount] = field(default_factory=list)

    def describe(self, unit: str) -> str:
        parts = [f"{s.path}: {s.used} of {s.examples} {unit} from {s.trees} trees"
                 + (f" ({s.skipped_lines} invalid lines skipped)" if s.skipped_lines else "") for s in self.sources]
        return "; ".join(parts) + f" -> {len(self.train)} train, {len(self.eval)} held out"


def _held_out(key: str, seed: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _take(items: list[T], spec: DatasetSpec, seed: int) -> list[T]:
    rng = random.Random(f"{seed}:{spec.path}")
    order = items[:]
    rng.shuffle(order)
    whole, part = divmod(spec.fraction, 1.0)
    taken = order * int(whole) + order[: round(part * len(order))]
    if spec.max_examples is not None:
        taken = taken[: spec.max_examples]
    return taken


def build_mix(
    specs: Sequence[DatasetSpec],
    workspace: Path,
    extract: Callable[[MessageTree], list[T]],
    key: Callable[[T], str],
    seed: int,
    val_fraction: float,
    skip_invalid: bool = False,
    units: Callable[[T], int] = lambda item: 1,
) -> Mix:
    mix = Mix()
    for spec in specs:
        path = resolve_dataset_path(spec, workspace)
        if path is None:
            continue
        count = SourceCount(spec.path)
        report = LoadReport()
        train_items: list[T] = []
        for tree in iter_trees(path, skip_invalid=skip_invalid, report=report):
            if not tree_is_used(tree):
                continue
            count.trees += 1
            for item in extract(tree):
                count.examples += 1
                if _held_out(key(item), seed, val_fraction):
                    mix.eval.append(item)
                else:
                    train_items.append(item)
        taken = _take(train_items, spec, seed)
        count.used = len(taken)
        count.units = sum(units(item) for item in taken)
        count.skipped_lines = len(report.skipped)
        mix.train.extend(taken)
        mix.sources.append(count)
    if not mix.train:
        raise UserError("datasets: no training examples in " + ", ".join(s.path for s in specs))
    random.Random(seed).shuffle(mix.train)
    return mix


def sft_mix(specs: Sequence[DatasetSpec], workspace: Path, seed: int, val_fraction: float, skip_invalid: bool = False) -> Mix:
    return build_mix(specs, workspace, sft_conversations, lambda c: c.tree_id, seed, val_fraction, skip_invalid)


def rm_mix(specs: Sequence[DatasetSpec], workspace: Path, seed: int, val_fraction: float, skip_invalid: bool = False) -> Mix:
    return build_mix(specs, workspace, rm_groups, lambda g: g.message_id, seed, val_fraction, skip_invalid,
                     units=lambda g: len(g.pairs))


def prompt_contexts(tree: MessageTree) -> list[tuple[Turn, ...]]:
    """Every conversation that ends with a usable prompter turn: what a policy is asked to answer."""
    contexts: list[tuple[Turn, ...]] = []
    for conversation in sft_conversations(tree):
        turns = conversation.turns
        for end, turn in enumerate(turns):
            if turn.role == "prompter":
                contexts.append(turns[: end + 1])
    # Paths share prefixes: keep each context once, in order.
    unique = list(dict.fromkeys(contexts))
    return unique


def prompt_mix(specs: Sequence[DatasetSpec], workspace: Path, seed: int, val_fraction: float, skip_invalid: bool = False) -> Mix:
    """Prompts for RL from export files, or from a JSONL of ``{"prompt": "..."}`` lines."""
    mix = Mix()
    export_specs = []
    for spec in specs:
        path = resolve_dataset_path(spec, workspace)
        if path is None:
            continue
        if _is_plain_prompt_file(path):
            count = SourceCount(spec.path)
            items = []
            for text in _read_plain_prompts(path):
                count.examples += 1
                item = (Turn("prompter", text),)
                (mix.eval if _held_out(text, seed, val_fraction) else items).append(item)
            taken = _take(items, spec, seed)
            count.used = len(taken)
            mix.train.extend(taken)
            mix.sources.append(count)
        else:
            export_specs.append(spec)
    if export_specs:
        exported = build_mix(export_specs, workspace, prompt_contexts, lambda c: c[0].text, seed, val_fraction, skip_invalid)
        mix.train.extend(exported.train)
        mix.eval.extend(exported.eval)
        mix.sources.extend(exported.sources)
    if not mix.train:
        raise UserError("prompts: no prompts in " + ", ".join(s.path for s in specs))
    random.Random(seed).shuffle(mix.train)
    return mix


def _is_plain_prompt_file(path: Path) -> bool:
    """A JSONL whose first object has a ``prompt`` key and no ``message_tree_id``."""
    import gzip
    import json

    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:  # type: ignore[operator]
        for line in handle:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and "prompt" in first and "message_tree_id" not in first
    return False


def _read_plain_prompts(path: Path) -> list[str]:
    import gzip
    import json

    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    prompts = []
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:  # type: ignore[operator]
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise UserError(f"{path}:{number}: expected an object with a non-empty string 'prompt'")
            prompts.append(obj["prompt"])
    return prompts


# --------------------------------------------------------------------------------------------
# Tokenized examples for the trainers


def tokenize_sft(
    conversations: Sequence[Conversation],
    tokenizer: "PreTrainedTokenizerBase",
    max_length: int,
    system: str | None = None,
) -> list[dict[str, list[int]]]:
    """``input_ids`` + ``assistant_masks`` rows; conversations left with no trained token are dropped."""
    rows = []
    for conversation in conversations:
        ids, mask = tokenize_with_mask(tokenizer, segments(conversation.turns, tokenizer.eos_token, system), max_length)
        if any(mask):
            rows.append({"input_ids": ids, "assistant_masks": mask})
    return rows


def rm_text(context: Sequence[Turn], reply: str, eos: str) -> str:
    """What the reward model reads: the conversation, then the reply as the assistant's turn."""
    return format_conversation([*context, Turn("assistant", reply)], eos)


def tokenize_rm(
    groups: Sequence[RankedGroup],
    tokenizer: "PreTrainedTokenizerBase",
    max_length: int,
    max_pairs_per_group: int | None = None,
) -> list[dict[str, list[int]]]:
    """``chosen_ids`` / ``rejected_ids`` rows, one per (better, worse) pair.

    Long conversations lose their beginning, not their end: the reward is read at the last token.
    """
    rows = []
    for group in groups:
        pairs = group.pairs
        if max_pairs_per_group is not None:
            pairs = pairs[:max_pairs_per_group]
        for better, worse in pairs:
            chosen = tokenizer(rm_text(group.context, better, tokenizer.eos_token), add_special_tokens=False)["input_ids"]
            rejected = tokenizer(rm_text(group.context, worse, tokenizer.eos_token), add_special_tokens=False)["input_ids"]
            rows.append({"chosen_ids": chosen[-max_length:], "rejected_ids": rejected[-max_length:]})
    return rows
