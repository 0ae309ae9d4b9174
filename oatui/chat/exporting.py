"""Conversations from the chat history, written out as Open-Assistant export trees.

One tree per conversation. Alternative answers to one prompt (messages sharing a parent) become
sibling replies, as in an export. Answers that were cancelled or failed are left out. Model answers
are marked ``synthetic`` with their ``model_name`` (they are the model's own words, unreviewed), so
the stages skip them unless ``demonstrations=True`` says a person vouches for them; to turn answers
into training data on purpose, rank them (``oatui chat --rank``, or rank mode in the app).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oatui.chat.history import ChatHistory, Conversation, Message
from oatui.data.trees import parse_tree
from oatui.errors import UserError
from oatui.fsutil import atomic_write_text

ORIGIN = "oatui-chat"


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(moment))


def conversation_tree(conversation: Conversation, messages: list[Message], lang: str = "en",
                      demonstrations: bool = False) -> dict[str, Any] | None:
    """The export tree of one conversation; None when it holds no complete prompter message."""
    kept = [m for m in messages if m.state == "complete" and m.text.strip()]
    if not kept or kept[0].role != "prompter":
        return None
    # Messages written without parents follow each other: the previous message is the parent.
    parents: dict[int, int | None] = {}
    previous: int | None = None
    known = {m.id for m in kept}
    for message in kept:
        parent = message.parent_id if message.parent_id in known else previous
        parents[message.id] = parent if message is not kept[0] else None
        previous = message.id
    ids = {m.id: str(uuid.uuid5(uuid.NAMESPACE_URL, f"oatui-chat:{conversation.id}:{m.id}:{conversation.created}"))
           for m in kept}
    nodes: dict[int, dict[str, Any]] = {}
    for message in kept:
        nodes[message.id] = {
            "message_id": ids[message.id],
            "parent_id": ids.get(parents[message.id]) if parents[message.id] is not None else None,
            "text": message.text,
            "role": message.role,
            "lang": lang,
            "review_count": 0,
            "review_result": None,
            "deleted": False,
            "rank": None,
            "synthetic": message.role == "assistant" and not demonstrations,
            "model_name": message.model if message.role == "assistant" else None,
            "emojis": {},
            "labels": {},
            "created_date": _iso(message.created),
            "replies": [],
        }
    root = nodes[kept[0].id]
    for message in kept[1:]:
        parent = parents[message.id]
        if parent is None or parent not in nodes:
            continue  # a second root cannot be expressed in one tree
        if nodes[parent]["role"] == message.role:
            continue  # two turns of one speaker in a row: not a conversation an export can hold
        nodes[parent]["replies"].append(nodes[message.id])
    tree: dict[str, Any] = {
        "message_tree_id": root["message_id"],
        "tree_state": "ready_for_export",
        "prompt": root,
        "origin": ORIGIN,
        "title": conversation.title,
    }
    if conversation.system:
        tree["system"] = conversation.system
    parse_tree(tree)
    return tree


def iter_trees(history: ChatHistory, lang: str = "en", demonstrations: bool = False) -> Iterator[dict[str, Any]]:
    for conversation in reversed(history.conversations(limit=1_000_000)):
        tree = conversation_tree(conversation, history.messages(conversation.id), lang, demonstrations)
        if tree is not None:
            yield tree


def export_history(history: ChatHistory, out: Path, lang: str = "en", demonstrations: bool = False) -> int:
    """Write every conversation as one export line to ``out`` (atomically); returns the tree count."""
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; name a file")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no folder {out.parent}")
    lines = [json.dumps(tree, ensure_ascii=False) for tree in iter_trees(history, lang, demonstrations)]
    atomic_write_text(out, "".join(f"{line}\n" for line in lines))
    return len(lines)
