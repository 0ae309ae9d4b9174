"""Which trees and messages are used, and what SFT conversations and RM groups they yield.

The rules (DESIGN.md, "Data"):
- a tree is used when ``tree_state == "ready_for_export"`` and its prompt is neither deleted nor
  rejected in review (``review_result`` is not false);
- a message is usable when it is not deleted, not rejected in review and not synthetic; an
  unusable message removes its whole subtree;
- SFT conversations: every root-to-leaf path of usable messages, a trailing prompter message
  dropped; a path with no assistant message left is not a conversation;
- RM groups: every usable prompter message with at least two usable assistant replies carrying a
  rank; the conversation up to that prompter message plus those replies ordered by rank (0 best);
  its pairs are all (better, worse) combinations (replies of equal rank form no pair).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
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


def tree_is_used(tree: MessageTree) -> bool:
    prompt = tree.prompt
    return tree.tree_state == READY and not prompt.deleted and prompt.review_result is not False


def message_is_usable(message: Message) -> bool:
    return not message.deleted and message.review_result is not False and not message.synthetic


def usable_children(message: Message) -> list[Message]:
    return [reply for reply in message.replies if message_is_usable(reply)]


def walk(tree: MessageTree) -> Iterator[tuple[Message, tuple[Turn, ...], list[Message]]]:
    """``(message, path from the root to it, its usable replies)`` for every usable message of a used
    tree, parents before children, siblings in order.

    An explicit stack carries the path, so that deep trees cannot hit the recursion limit.
    """
    if not tree_is_used(tree) or not message_is_usable(tree.prompt):
        return
    stack: list[tuple[Message, tuple[Turn, ...]]] = [(tree.prompt, (_turn(tree.prompt),))]
    while stack:
        message, path = stack.pop()
        children = usable_children(message)
        yield message, path, children
        for child in reversed(children):
            stack.append((child, path + (_turn(child),)))


def iter_usable(tree: MessageTree) -> Iterator[Message]:
    """Every usable message of a used tree, parents before children."""
    for message, _, _ in walk(tree):
        yield message


def _turn(message: Message) -> Turn:
    return Turn(message.role, message.text, message.lang)


def sft_conversations(tree: MessageTree) -> list[Conversation]:
    conversations: list[Conversation] = []
    for _, path, children in walk(tree):
        if children:
            continue
        turns = path[:-1] if path[-1].role == "prompter" else path
        if any(turn.role == "assistant" for turn in turns):
            conversations.append(Conversation(turns, tree.message_tree_id))
    return conversations


def rm_groups(tree: MessageTree) -> list[RankedGroup]:
    groups: list[RankedGroup] = []
    for message, path, children in walk(tree):
        if message.role != "prompter":
            continue
        ranked = [c for c in children if c.role == "assistant" and c.rank is not None]
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

    def add(self, tree: MessageTree) -> None:
        self.trees_total += 1
        if not tree_is_used(tree):
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


def compute_stats(trees: Iterable[MessageTree]) -> Stats:
    stats = Stats()
    for tree in trees:
        stats.add(tree)
    return stats
