"""From the config's ``datasets`` list to SFT, RM and prompt examples, with held-out splits.

Each entry names an export file (or ``sample`` / ``feedback``) and a ``fraction``: the examples of
that file are taken in a seeded order, cut to the fraction (or repeated, above 1), then capped by
``max_examples``. Held-out examples are chosen by a seeded hash of the tree (SFT) or the ranked
group (RM), so a split never changes when other files join the mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from oatui.config import DatasetSpec
from oatui.data.format import format_conversation, segments, tokenize_with_mask
from oatui.data.rules import (
    Conversation,
    RankedGroup,
    Turn,
    prompt_contexts,
    rm_groups,
    sft_conversations,
    tree_is_used,
)
from oatui.data.sample import SAMPLE_FILE
from oatui.data.trees import LoadReport, MessageTree, iter_lines, iter_trees
from oatui.errors import UserError
from oatui.fsutil import expand_user
from oatui.workspace import FEEDBACK_FILE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


def resolve_dataset_path(spec: DatasetSpec, workspace: Path) -> Path | None:
    """The file behind a dataset entry; None for an optional one that does not exist yet."""
    if spec.path == "sample":
        return SAMPLE_FILE
    if spec.path == "feedback":
        path = workspace / FEEDBACK_FILE
    else:
        path = expand_user(spec.path)
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
        parts = [f"{s.path}: {s.used} of {s.examples} {unit}" + (f" from {s.trees} trees" if s.trees else "")
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
    read: Callable[[Path, SourceCount, DatasetSpec], list[T]],
    key: Callable[[T], str],
    seed: int,
    val_fraction: float,
    units: Callable[[T], int] = lambda item: 1,
    what: str = "datasets",
) -> Mix:
    """Every file's examples (``read`` fills in its tree and skipped-line counts, and applies the
    entry's ``lang`` and ``top_k``), split, cut to its fraction, then all of them shuffled together."""
    mix = Mix()
    for spec in specs:
        path = resolve_dataset_path(spec, workspace)
        if path is None:
            continue
        count = SourceCount(spec.path)
        train_items: list[T] = []
        for item in read(path, count, spec):
            count.examples += 1
            (mix.eval if _held_out(key(item), seed, val_fraction) else train_items).append(item)
        taken = _take(train_items, spec, seed)
        count.used = len(taken)
        count.units = sum(units(item) for item in taken)
        mix.train.extend(taken)
        mix.sources.append(count)
    if not mix.train:
        raise UserError(f"{what}: no training examples in " + ", ".join(s.path for s in specs))
    random.Random(seed).shuffle(mix.train)
    return mix


def _from_trees(
    extract: Callable[[MessageTree, int | None], list[T]], skip_invalid: bool,
) -> Callable[[Path, SourceCount, DatasetSpec], list[T]]:
    """A ``read`` for :func:`build_mix`: ``extract(tree, top_k)`` applied to every used tree of an
    export file whose prompt is in one of the entry's languages."""

    def read(path: Path, count: SourceCount, spec: DatasetSpec) -> list[T]:
        report = LoadReport()
        items: list[T] = []
        for tree in iter_trees(path, skip_invalid=skip_invalid, report=report):
            if tree_is_used(tree, spec.lang):
                count.trees += 1
                items.extend(extract(tree, spec.top_k))
        count.skipped_lines = len(report.skipped)
        return items

    return read


def sft_mix(specs: Sequence[DatasetSpec], workspace: Path, seed: int, val_fraction: float, skip_invalid: bool = False) -> Mix:
    return build_mix(specs, workspace, _from_trees(sft_conversations, skip_invalid), lambda c: c.tree_id, seed,
                     val_fraction)


def rm_mix(specs: Sequence[DatasetSpec], workspace: Path, seed: int, val_fraction: float, skip_invalid: bool = False) -> Mix:
    return build_mix(specs, workspace, _from_trees(rm_groups, skip_invalid), lambda g: g.message_id, seed,
                     val_fraction, units=lambda g: len(g.pairs))


def prompt_mix(specs: Sequence[DatasetSpec], workspace: Path, seed: int, val_fraction: float, skip_invalid: bool = False) -> Mix:
    """Prompts for RL: every conversation that ends with a prompter turn in export files (see
    :func:`~oatui.data.rules.prompt_contexts`), or the lines of a JSONL of ``{"prompt": "..."}``.

    A prompt is held out by its first turn, so the follow-ups of a held-out question are held out too.
    """
    # Open-Assistant's RL prompts ignore top_k: every prompter turn of a used tree is a prompt.
    from_trees = _from_trees(lambda tree, top_k: prompt_contexts(tree), skip_invalid)

    def read(path: Path, count: SourceCount, spec: DatasetSpec) -> list[tuple[Turn, ...]]:
        if not _is_plain_prompt_file(path):
            return from_trees(path, count, spec)
        if spec.lang is not None:
            raise UserError(f"prompts: {spec.path}: lang filters export trees; a plain prompt file has no languages")
        report = LoadReport()
        prompts = [(Turn("prompter", text),) for text in _read_plain_prompts(path, skip_invalid, report)]
        count.skipped_lines = len(report.skipped)
        return prompts

    return build_mix(specs, workspace, read, lambda c: c[0].text, seed, val_fraction, what="prompts")


def _is_plain_prompt_file(path: Path) -> bool:
    """A JSONL whose first object has a ``prompt`` key and no ``message_tree_id``."""
    with contextlib.closing(iter_lines(path)) as lines:
        for _, line in lines:
            try:
                first = json.loads(line)
            except json.JSONDecodeError:
                return False
            return isinstance(first, dict) and "prompt" in first and "message_tree_id" not in first
    return False


def _read_plain_prompts(path: Path, skip_invalid: bool, report: LoadReport) -> list[str]:
    prompts = []
    for number, line in iter_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg} at column {error.colno})"
        else:
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
                prompts.append(obj["prompt"])
                continue
            problem = "expected an object with a non-empty string 'prompt'"
        if not skip_invalid:
            raise UserError(f"{path}:{number}: {problem}")
        report.skipped.append((number, problem))
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


def tokenize_rm_groups(
    groups: Sequence[RankedGroup],
    tokenizer: "PreTrainedTokenizerBase",
    max_length: int,
    max_replies: int | None = None,
) -> list[dict[str, list]]:
    """``reply_ids`` (one token list per reply, best first) + ``reply_ranks`` rows, one per group, for
    the K-wise loss: every reply is encoded once. A group keeps its best ``max_replies`` replies
    (Open-Assistant's ``max_replies``); one left with no pair (all of equal rank) is dropped.
    Long conversations lose their beginning, as in :func:`tokenize_rm`.
    """
    rows = []
    for group in groups:
        replies, ranks = group.replies, group.ranks
        if max_replies is not None:
            replies, ranks = replies[:max_replies], ranks[:max_replies]
        if len(set(ranks)) < 2:
            continue
        ids = [tokenizer(rm_text(group.context, reply, tokenizer.eos_token), add_special_tokens=False)["input_ids"]
               for reply in replies]
        rows.append({"reply_ids": [reply[-max_length:] for reply in ids], "reply_ranks": list(ranks)})
    return rows
