"""Rankings made while chatting, written back as Open-Assistant export trees.

A ranking is a conversation that ends with a prompter turn, and K sampled answers put in order by
a person (best first). Optionally one answer is edited into a better demonstration (it becomes the
best-ranked reply, the answer it came from follows it) and some are rejected as unusable (they are
kept with ``review_result: false``, so the rules drop them, as a reviewer's rejection would).

Each ranking is one line appended to ``WORKSPACE/data/feedback.trees.jsonl`` under the file's lock,
in one write: concurrent apps never interleave or tear lines. The file is an export like any other:
``oatui data stats`` counts it and the SFT and RM stages read it through the ``feedback`` dataset.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oatui.data.trees import parse_tree
from oatui.fsutil import append_jsonl_locked, make_private_dir

if TYPE_CHECKING:
    from oatui.chat.ranking import Order

ORIGIN = "oatui"


@dataclass
class RankedAnswer:
    text: str
    rejected: bool = False
    edited_from: str | None = None
    """For an answer the person rewrote: the model's original text."""
    seed: int | None = None


@dataclass
class Ranking:
    """Turns before the answers (``(role, text)`` pairs, ending with the prompter), and the answers best first."""

    context: Sequence[tuple[str, str]]
    answers: Sequence[RankedAnswer]
    model_name: str | None = None
    lang: str = "en"
    system: str | None = None
    created: float = field(default_factory=time.time)

    def validate(self) -> None:
        if not self.context or self.context[-1][0] != "prompter":
            raise ValueError("a ranking answers a conversation that ends with the prompter's turn")
        for role, text in self.context:
            if role not in ("prompter", "assistant") or not text.strip():
                raise ValueError("every turn of the conversation needs a role and some text")
        kept = [answer for answer in self.answers if not answer.rejected]
        if len(self.answers) < 2 and not any(answer.edited_from for answer in self.answers):
            raise ValueError("rank at least two answers (or edit one into a demonstration)")
        if not kept:
            raise ValueError("every answer was rejected: nothing to learn from")


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(moment))


def _node(role: str, text: str, parent: str | None, ranking: Ranking, **fields: Any) -> dict[str, Any]:
    node: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "parent_id": parent,
        "text": text,
        "role": role,
        "lang": ranking.lang,
        "review_count": 1,
        "review_result": True,
        "deleted": False,
        "rank": None,
        "synthetic": False,
        "model_name": None,
        "emojis": {},
        "labels": {},
        "created_date": _iso(ranking.created),
        "replies": [],
    }
    node.update(fields)
    return node


def ranking_to_tree(ranking: Ranking) -> dict[str, Any]:
    """The export tree of one ranking (validated against the export schema before it is returned)."""
    ranking.validate()
    root: dict[str, Any] | None = None
    parent: dict[str, Any] | None = None
    for role, text in ranking.context:
        node = _node(role, text, parent["message_id"] if parent else None, ranking)
        if role == "assistant":
            node["model_name"] = ranking.model_name
        if parent is None:
            root = node
        else:
            parent["replies"].append(node)
        parent = node
    assert root is not None and parent is not None
    rank = 0
    replies = []
    for answer in ranking.answers:
        if answer.rejected:
            replies.append(_node("assistant", answer.text, parent["message_id"], ranking, review_result=False,
                                 model_name=ranking.model_name, labels={"spam": 1.0}))
            continue
        if answer.edited_from is not None:
            # The person's rewrite is a demonstration: best-ranked, written by a human.
            replies.append(_node("assistant", answer.text, parent["message_id"], ranking, rank=rank,
                                 labels={"edited": 1.0}))
            rank += 1
            if answer.edited_from.strip() and answer.edited_from != answer.text:
                replies.append(_node("assistant", answer.edited_from, parent["message_id"], ranking, rank=rank,
                                     model_name=ranking.model_name))
                rank += 1
            continue
        replies.append(_node("assistant", answer.text, parent["message_id"], ranking, rank=rank,
                             model_name=ranking.model_name))
        rank += 1
    parent["replies"].extend(replies)
    tree = {
        "message_tree_id": root["message_id"],
        "tree_state": "ready_for_export",
        "prompt": root,
        "origin": ORIGIN,
    }
    if ranking.system:
        tree["system"] = ranking.system
    parse_tree(tree)  # the schema every export line must pass
    return tree


def append_tree(feedback_file: Path, tree: dict[str, Any]) -> dict[str, Any]:
    """Append an export tree as one line (locked, atomic append); returns the tree."""
    make_private_dir(feedback_file.parent)
    append_jsonl_locked(feedback_file, tree)
    return tree


def append_ranking(feedback_file: Path, ranking: Ranking) -> dict[str, Any]:
    """Append the ranking's tree as one line (locked, atomic append); returns the tree."""
    return append_tree(feedback_file, ranking_to_tree(ranking))


def answers_model_name(model: str | None, run: str | None = None) -> str | None:
    """The ``model_name`` recorded for a served model's answers: the training run it was exported
    from when that is known (an export's name says little once it has been replaced), else its name."""
    return run or model


def save_ranking(feedback_file: Path, context: Sequence[tuple[str, str]], texts: Sequence[str], order: Order,
                 edits: dict[int, str] | None = None, seeds: Sequence[int | None] | None = None,
                 model: str | None = None, run: str | None = None, lang: str = "en",
                 system: str | None = None) -> dict[str, Any]:
    """Save the person's ranking of ``texts``, the answers of served ``model`` to ``context`` (``run``:
    the training run behind it, when known): its export tree, appended to the feedback file.
    ``order`` and ``edits`` index ``texts``; returns the tree."""
    from oatui.chat.ranking import ranked_answers

    ranking = Ranking(context=list(context), answers=ranked_answers(texts, order, edits, seeds),
                      model_name=answers_model_name(model, run), lang=lang, system=system)
    return append_ranking(feedback_file, ranking)
