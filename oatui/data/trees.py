"""Open-Assistant export trees: the schema, validated per line, and a streaming loader.

One JSON object per line, each a message tree (``message_tree_id``, ``tree_state``, ``prompt``,
``origin``), the prompt and its ``replies`` recursively being message nodes. Files may be gzipped.
Keys beyond the ones below are kept in ``extra`` (real exports carry many more) and ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oatui.errors import UserError
from oatui.fsutil import UnreadableFile, iter_text_lines

ROLES = ("prompter", "assistant")


class TreeFormatError(ValueError):
    """A line that is not a valid export tree; ``path`` says where inside the object."""


@dataclass
class Message:
    message_id: str
    text: str
    role: str
    parent_id: str | None = None
    lang: str | None = None
    review_count: int = 0
    review_result: bool | None = None
    deleted: bool = False
    rank: int | None = None
    synthetic: bool = False
    model_name: str | None = None
    emojis: dict[str, int] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    replies: list["Message"] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            message_id=self.message_id,
            parent_id=self.parent_id,
            text=self.text,
            role=self.role,
            lang=self.lang,
            review_count=self.review_count,
            review_result=self.review_result,
            deleted=self.deleted,
            rank=self.rank,
            synthetic=self.synthetic,
            model_name=self.model_name,
            emojis=self.emojis,
            labels=self.labels,
            replies=[reply.to_dict() for reply in self.replies],
        )
        return out


@dataclass
class MessageTree:
    message_tree_id: str
    tree_state: str
    prompt: Message
    origin: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            message_tree_id=self.message_tree_id,
            tree_state=self.tree_state,
            prompt=self.prompt.to_dict(),
            origin=self.origin,
        )
        return out


_MESSAGE_KEYS = {
    "message_id", "parent_id", "text", "role", "lang", "review_count", "review_result", "deleted",
    "rank", "synthetic", "model_name", "emojis", "labels", "replies",
}
_TREE_KEYS = {"message_tree_id", "tree_state", "prompt", "origin"}


def _expect(obj: dict[str, Any], key: str, kinds: tuple[type, ...], where: str, required: bool = False) -> Any:
    if key not in obj or obj[key] is None:
        if required:
            raise TreeFormatError(f"{where}{key}: missing")
        return None
    value = obj[key]
    # bool is an int subclass: an int field must not accept true/false, and vice versa.
    if isinstance(value, bool) and bool not in kinds:
        raise TreeFormatError(f"{where}{key}: expected {_kind_names(kinds)}, got {json.dumps(value)}")
    if not isinstance(value, kinds):
        raise TreeFormatError(f"{where}{key}: expected {_kind_names(kinds)}, got {_describe(value)}")
    return value


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true/false", dict: "an object", list: "a list", float: "a number"}
    return " or ".join(names.get(kind, kind.__name__) for kind in kinds)


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else f"{type(value).__name__} {text[:37]}..."


def parse_message(obj: Any, where: str = "prompt.", depth: int = 0) -> Message:
    if not isinstance(obj, dict):
        raise TreeFormatError(f"{where.rstrip('.')}: expected an object, got {_describe(obj)}")
    if depth > 1000:
        raise TreeFormatError(f"{where.rstrip('.')}: tree deeper than 1000 messages")
    message_id = _expect(obj, "message_id", (str,), where, required=True)
    text = _expect(obj, "text", (str,), where, required=True)
    role = _expect(obj, "role", (str,), where, required=True)
    if role not in ROLES:
        raise TreeFormatError(f"{where}role: expected 'prompter' or 'assistant', got {_describe(role)}")
    replies_raw = _expect(obj, "replies", (list,), where) or []
    rank = _expect(obj, "rank", (int,), where)
    review_count = _expect(obj, "review_count", (int,), where) or 0
    message = Message(
        message_id=message_id,
        text=text,
        role=role,
        parent_id=_expect(obj, "parent_id", (str,), where),
        lang=_expect(obj, "lang", (str,), where),
        review_count=review_count,
        review_result=_expect(obj, "review_result", (bool,), where),
        deleted=bool(_expect(obj, "deleted", (bool,), where)),
        rank=rank,
        synthetic=bool(_expect(obj, "synthetic", (bool,), where)),
        model_name=_expect(obj, "model_name", (str,), where),
        emojis=_expect(obj, "emojis", (dict,), where) or {},
        labels=_expect(obj, "labels", (dict,), where) or {},
        extra={k: v for k, v in obj.items() if k not in _MESSAGE_KEYS},
    )
    message.replies = [
        parse_message(reply, f"{where}replies[{i}].", depth + 1) for i, reply in enumerate(replies_raw)
    ]
    return message


def parse_tree(obj: Any) -> MessageTree:
    """Validate one decoded line; raises :class:`TreeFormatError` naming the offending field."""
    if not isinstance(obj, dict):
        raise TreeFormatError(f"expected a message tree object, got {_describe(obj)}")
    tree_id = _expect(obj, "message_tree_id", (str,), "", required=True)
    state = _expect(obj, "tree_state", (str,), "", required=True)
    if "prompt" not in obj or obj["prompt"] is None:
        raise TreeFormatError("prompt: missing")
    prompt = parse_message(obj["prompt"], "prompt.")
    return MessageTree(
        message_tree_id=tree_id,
        tree_state=state,
        prompt=prompt,
        origin=_expect(obj, "origin", (str,), ""),
        extra={k: v for k, v in obj.items() if k not in _TREE_KEYS},
    )


@dataclass
class LoadReport:
    """What a lenient load skipped: ``(line, reason)`` pairs."""

    skipped: list[tuple[int, str]] = field(default_factory=list)


def iter_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line of a text file, gzipped or not.

    A file that is missing, a folder, a device, unreadable, corrupted (gzip), not UTF-8 or with a
    line longer than :data:`oatui.fsutil.MAX_LINE_BYTES` is a :class:`UserError` naming it (and
    the line).
    """
    try:
        for line_number, line in iter_text_lines(path):
            if line.strip():
                yield line_number, line
    except UnreadableFile as error:
        raise UserError(str(error)) from None


def iter_trees(
    path: str | os.PathLike[str],
    skip_invalid: bool = False,
    report: LoadReport | None = None,
) -> Iterator[MessageTree]:
    """Stream the trees of an export file (JSONL or .jsonl.gz), validating each line.

    A malformed line raises :class:`UserError` ``FILE:LINE: what is wrong``, unless
    ``skip_invalid``, in which case it is recorded in ``report`` and skipped. Blank lines are ignored.
    """
    for line_number, line in iter_lines(path):
        try:
            tree = parse_tree(json.loads(line))
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg} at column {error.colno})"
        except TreeFormatError as error:
            problem = str(error)
        except RecursionError:
            problem = "nested too deeply"
        else:
            yield tree
            continue
        if not skip_invalid:
            raise UserError(f"{path}:{line_number}: {problem}")
        if report is not None:
            report.skipped.append((line_number, problem))


def load_trees(path: str | os.PathLike[str], skip_invalid: bool = False) -> list[MessageTree]:
    return list(iter_trees(path, skip_invalid=skip_invalid))
