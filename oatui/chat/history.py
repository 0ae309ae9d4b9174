"""Chat conversations kept in SQLite (``WORKSPACE/state/chats.sqlite``).

Two tables: ``conversations`` (title, model, system prompt, sampling parameters, times) and
``messages`` (role ``prompter`` or ``assistant``, text, the model and parameters that produced an
answer, and its state: ``complete``, ``cancelled`` or ``error``). A message may name a
``parent_id``, so that alternative answers to one prompt form a tree, as in Open-Assistant exports.

The database runs in WAL mode with a busy timeout, so two app instances on one workspace can read
and write it at the same time. Every call opens its own short-lived connection: a ``ChatHistory``
can be used from any thread, and a crash never leaves a transaction open.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oatui.errors import UserError

SCHEMA_VERSION = 1
ROLES = ("prompter", "assistant")
STATES = ("complete", "cancelled", "error")
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    model TEXT,
    system TEXT,
    params TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
    role TEXT NOT NULL CHECK (role IN ('prompter', 'assistant')),
    text TEXT NOT NULL,
    model TEXT,
    params TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'complete' CHECK (state IN ('complete', 'cancelled', 'error')),
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE INDEX IF NOT EXISTS conversations_by_update ON conversations(updated DESC);
"""


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    model: str | None
    system: str | None
    params: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    message_count: int = 0


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    parent_id: int | None
    role: str
    text: str
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    state: str = "complete"
    created: float = 0.0


class ChatStoreError(UserError, ValueError):
    """The chat history file is not one oatui can read (garbage, damaged, someone else's tables)."""


class ChatHistory:
    """The conversation store of one workspace."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            # WAL lets readers and one writer work at once across processes; it is a property of
            # the file, so setting it once is enough, and setting it again is harmless.
            connection.execute("PRAGMA journal_mode=WAL")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ChatStoreError(
                    f"{self.path}: written by a newer oatui (schema {version}, this one reads {SCHEMA_VERSION})"
                )
            connection.executescript(_SCHEMA)
            if version < SCHEMA_VERSION:
                connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as error:
            raise ChatStoreError(f"{self.path}: cannot open the chat history ({error})") from None
        try:
            connection.row_factory = sqlite3.Row
            # A damaged file can hold text that is not UTF-8: show it with replacement characters.
            connection.text_factory = lambda raw: raw.decode("utf-8", "replace")
            connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA foreign_keys=ON")
            yield connection
        except sqlite3.DatabaseError as error:
            # Not a database, a damaged one, or one whose tables are not ours: one line naming it.
            raise ChatStoreError(f"{self.path}: not a chat history oatui can read ({error})") from None
        except UnicodeDecodeError:
            # sqlite's own message about a damaged schema can hold bytes that are not UTF-8.
            raise ChatStoreError(f"{self.path}: not a chat history oatui can read (damaged)") from None
        finally:
            connection.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlock)."""
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    # -- conversations ------------------------------------------------------------------------
    def new_conversation(
        self,
        title: str,
        *,
        model: str | None = None,
        system: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> Conversation:
        now = time.time()
        title = _title(title)
        with self._write() as connection:
            cursor = connection.execute(
                "INSERT INTO conversations (title, model, system, params, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
                (title, model, system, json.dumps(params or {}), now, now),
            )
            conversation_id = int(cursor.lastrowid or 0)
        return Conversation(conversation_id, title, model, system, dict(params or {}), now, now, 0)

    def conversation(self, conversation_id: int) -> Conversation | None:
        with self._connect() as connection:
            row = connection.execute(
                "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count "
                "FROM conversations c WHERE c.id = ?",
                (conversation_id,),
            ).fetchone()
        return None if row is None else _conversation(row)

    def conversations(self, limit: int = 200) -> list[Conversation]:
        """The most recently updated conversations first."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count "
                "FROM conversations c ORDER BY c.updated DESC, c.id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_conversation(row) for row in rows]

    def update_conversation(
        self,
        conversation_id: int,
        *,
        title: str | None = None,
        model: str | None = None,
        system: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        changes: dict[str, Any] = {}
        if title is not None:
            changes["title"] = _title(title)
        if model is not None:
            changes["model"] = model
        if system is not None:
            changes["system"] = system
        if params is not None:
            changes["params"] = json.dumps(params)
        changes["updated"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in changes)
        with self._write() as connection:
            connection.execute(
                f"UPDATE conversations SET {assignments} WHERE id = ?", (*changes.values(), conversation_id)
            )

    def delete_conversation(self, conversation_id: int) -> None:
        with self._write() as connection:
            connection.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # -- messages -----------------------------------------------------------------------------
    def add_message(
        self,
        conversation_id: int,
        role: str,
        text: str,
        *,
        parent_id: int | None = None,
        model: str | None = None,
        params: dict[str, Any] | None = None,
        state: str = "complete",
    ) -> Message:
        if role not in ROLES:
            raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        if state not in STATES:
            raise ValueError(f"state {state!r}: expected one of {', '.join(STATES)}")
        now = time.time()
        with self._write() as connection:
            cursor = connection.execute(
                "INSERT INTO messages (conversation_id, parent_id, role, text, model, params, state, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, parent_id, role, text, model, json.dumps(params or {}), state, now),
            )
            message_id = int(cursor.lastrowid or 0)
            connection.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
        return Message(message_id, conversation_id, parent_id, role, text, model, dict(params or {}), state, now)

    def messages(self, conversation_id: int) -> list[Message]:
        """The messages of a conversation in the order they were written."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
            ).fetchall()
        return [_message(row) for row in rows]

    def thread(self, conversation_id: int) -> list[Message]:
        """The current line of a conversation: from its last message back through parents to the root.

        Messages written without ``parent_id`` follow each other in order.
        """
        messages = self.messages(conversation_id)
        if not messages:
            return []
        by_id = {message.id: message for message in messages}
        if all(message.parent_id is None for message in messages):
            return messages
        line = []
        current: Message | None = messages[-1]
        while current is not None:
            line.append(current)
            current = by_id.get(current.parent_id) if current.parent_id is not None else None
        return list(reversed(line))


def _title(text: str) -> str:
    title = " ".join(text.split())
    if len(title) > 80:
        title = title[:79].rstrip() + "…"
    return title or "(untitled)"


def _params(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except (ValueError, TypeError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _conversation(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        title=row["title"],
        model=row["model"],
        system=row["system"],
        params=_params(row["params"]),
        created=row["created"],
        updated=row["updated"],
        message_count=row["message_count"],
    )


def _message(row: sqlite3.Row) -> Message:
    return Message(
        id=row["id"],
        conversation_id=row["conversation_id"],
        parent_id=row["parent_id"],
        role=row["role"],
        text=row["text"],
        model=row["model"],
        params=_params(row["params"]),
        state=row["state"],
        created=row["created"],
    )
