"""Which trees and messages are used, and what SFT conversations and RM groups they yield.

The rules (DESIGN.md, "Data"):
- a tree is used when ``tree_state == "ready_for_export"`` and its prompt is neither deleted nor
  rejected in review (``review_result`` is not false);
- a message is usable when it is not deleted, not rejected in review and not synthetic; an
  unusable message removes its whole subtree;
- SFT conversations: every root-to-leaf path of usable messages, a trailing prompter message
  dropped; a path with no assistant message left is not a conversation; paths that end up the same
  (several prompter leaves under one answer) are one conversation;
- a dataset entry's ``lang`` keeps a tree only when its prompt's ``lang`` is listed (Open-Assistant's
  rule; the messages inside a kept tree stay whatever their language);
- a dataset entry's ``top_k`` keeps, under every prompter message, only the assistant replies ranked
  better than ``top_k`` (rank < top_k); an unranked reply is kept only when it is its prompter
  message's one reply in the export (Open-Assistant's ``thread_filter``). It shapes SFT conversations
  and the conversations RM groups start from (not a group's replies), never RL prompts, as there;
- RM groups: every usable prompter message with at least two usable assistant replies carrying a
  rank; the conversation up to that prompter message plus those replies ordered by rank (0 best);
  its pairs are all (better, worse) combinations (replies of equal rank form no pair).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import combinations

from oatui.data.trees import Message, MessageTree

READY = "ready_for_export"


@dataclass(frozen=True)
class Turn:
    role: str
    text: str
    lang: str | None = None


@dataclass(frozen=True)
class Conversation:
    """An SFT example: alternating turns ending with an assistant turn."""

    turns: tuple[Turn, ...]
    tree_id: str

    @property
    def lang(self) -> str | None:
        return self.turns[0].lang


@dataclass(frozen=True)
class RankedGroup:
    """An RM example: a conversation ending with a prompter turn, and replies best first."""

    context: tuple[Turn, ...]
    replies: tuple[str, ...]
    ranks: tuple[int, ...]
    tree_id: str
    message_id: str

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(better, worse) for every two replies of different rank."""
        ranked = list(zip(self.replies, self.ranks))
        return [(better, worse) for (better, rb), (worse, rw) in combinations(ranked, 2) if rb < rw]

    @property
    def lang(self) -> str | None:
        return self.context[0].lang


def tree_is_used(tree: MessageTree, lang: Collection[str] | None = None) -> bool:
    """Ready for export, its prompt neither deleted nor rejected, and (when ``lang`` lists languages)
    its prompt in one of them."""
    prompt = tree.prompt
    if lang is not None and prompt.lang not in lang:
        return False
    return tree.tree_state == READY and not prompt.deleted and prompt.review_result is not False


def message_is_usable(message: Message) -> bool:
    return not message.deleted and message.review_result is not False and not message.synthetic


def usable_children(message: Message) -> list[Message]:
    return [reply for reply in message.replies if message_is_usable(reply)]


def within_top_k(reply: Message, parent: Message, top_k: int | None) -> bool:
    """Open-Assistant's ``top_k``: an assistant reply ranked ``top_k`` or worse is left out; an
    unranked one too, unless it is its parent's only reply (counting every reply in the export)."""
    if top_k is None or reply.role != "assistant":
        return True
    if reply.rank is None:
        return len(parent.replies) <= 1
    return reply.rank < top_k


def kept_children(message: Message, top_k: int | None = None) -> list[Message]:
    """The usable replies of a message that are within ``top_k``: the ones a walk descends into."""
    return [child for child in usable_children(message) if within_top_k(child, message, top_k)]


def walk(tree: MessageTree, top_k: int | None = None) -> Iterator[tuple[Message, tuple[Turn, ...], list[Message]]]:
    """``(message, path from the root to it, its usable replies)`` for every usable message of a used
    tree, parents before children, siblings in order. With ``top_k``, replies outside the top k (see
    :func:`within_top_k`) are left out with their subtrees, as unusable ones are.

    An explicit stack carries the path, so that deep trees cannot hit the recursion limit.
    """
    if not tree_is_used(tree) or not message_is_usable(tree.prompt):
        return
    stack: list[tuple[Message, tuple[Turn, ...]]] = [(tree.prompt, (_turn(tree.prompt),))]
    while stack:
        message, path = stack.pop()
        children = kept_children(message, top_k)
        yield message, path, children
        for child in reversed(children):
            stack.append((child, path + (_turn(child),)))


def iter_usable(tree: MessageTree) -> Iterator[Message]:
    """Every usable message of a used tree, parents before children."""
    for message, _, _ in walk(tree):
        yield message


def _turn(message: Message) -> Turn:
    return Turn(message.role, message.text, message.lang)


def sft_conversations(tree: MessageTree, top_k: int | None = None) -> list[Conversation]:
    """Every root-to-leaf path, a trailing prompter message dropped; each distinct path once.

    Such a conversation ends with an answer that is a leaf or has a prompter leaf under it; several
    prompter leaves under one answer make that one conversation once (Open-Assistant keeps only the
    first prompter leaf, for the same reason).
    """
    conversations: list[Conversation] = []
    for message, path, children in walk(tree, top_k):
        if message.role != "assistant":
            continue
        if not children or any(not kept_children(child, top_k) for child in children):
            conversations.append(Conversation(path, tree.message_tree_id))
    return conversations


def rm_groups(tree: MessageTree, top_k: int | None = None) -> list[RankedGroup]:
    """Ranked groups; ``top_k`` limits the conversations they start from, not their replies."""
    groups: list[RankedGroup] = []
    for message, path, _ in walk(tree, top_k):
        if message.role != "prompter":
            continue
        ranked = [c for c in usable_children(message) if c.role == "assistant" and c.rank is not None]
        if len(ranked) >= 2:
            ranked.sort(key=lambda reply: reply.rank)  # type: ignore[arg-type, return-value]
            groups.append(
                RankedGroup(
                    context=path,
                    replies=tuple(reply.text for reply in ranked),
                    ranks=tuple(reply.rank for reply in ranked),  # type: ignore[misc]
                    tree_id=tree.message_tree_id,
                    message_id=message.message_id,
                )
            )
    return groups


def prompt_contexts(tree: MessageTree) -> list[tuple[Turn, ...]]:
    """Every path that ends with a usable prompter message, answered or not: what a policy is asked to answer."""
    return [path for message, path, _ in walk(tree) if message.role == "prompter"]


@dataclass
class Stats:
    trees_total: int = 0
    trees: int = 0
    messages: int = 0
    sft_conversations: int = 0
    rm_groups: int = 0
    rm_pairs: int = 0
    languages: Counter[str] = field(default_factory=Counter)
    lang: Collection[str] | None = None
    """Count only the trees whose prompt is in one of these languages (None: every tree)."""

    def add(self, tree: MessageTree) -> None:
        self.trees_total += 1
        if not tree_is_used(tree, self.lang):
            return
        self.trees += 1
        for message in iter_usable(tree):
            self.messages += 1
            self.languages[message.lang or "unknown"] += 1
        self.sft_conversations += len(sft_conversations(tree))
        groups = rm_groups(tree)
        self.rm_groups += len(groups)
        self.rm_pairs += sum(len(group.pairs) for group in groups)

    def to_dict(self) -> dict[str, object]:
        return {
            "trees_total": self.trees_total,
            "trees": self.trees,
            "messages": self.messages,
            "sft_conversations": self.sft_conversations,
            "rm_groups": self.rm_groups,
            "rm_pairs": self.rm_pairs,
            "languages": dict(sorted(self.languages.items(), key=lambda kv: (-kv[1], kv[0]))),
        }


def compute_stats(trees: Iterable[MessageTree], lang: Collection[str] | None = None) -> Stats:
    stats = Stats(lang=lang)
    for tree in trees:
        stats.add(tree)
    return stats
