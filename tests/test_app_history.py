"""The chat history store: conversations and messages in SQLite, WAL mode, two writers at once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from oatui.chat.history import ChatHistory


def test_conversations_and_messages_round_trip(tmp_path: Path) -> None:
    history = ChatHistory(tmp_path / "state" / "chats.sqlite")
    first = history.new_conversation("  How do I\nbake bread?  ", model="policy", system="be brief",
                                     params={"temperature": 0.7})
    assert first.title == "How do I bake bread?"
    asked = history.add_message(first.id, "prompter", "How do I bake bread?")
    answer = history.add_message(first.id, "assistant", "Flour, water, salt, yeast.", parent_id=asked.id,
                                 model="policy", params={"max_new_tokens": 64})
    second = history.new_conversation("x" * 200)
    assert len(second.title) == 80 and second.title.endswith("…")
    history.add_message(second.id, "prompter", "hi")
    # Most recently updated first; counts are included.
    listed = history.conversations()
    assert [c.id for c in listed] == [second.id, first.id]
    assert listed[1].message_count == 2 and listed[1].params == {"temperature": 0.7}
    assert listed[1].system == "be brief"
    messages = history.messages(first.id)
    assert [(msg.role, msg.text, msg.parent_id) for msg in messages] == [
        ("prompter", "How do I bake bread?", None), ("assistant", "Flour, water, salt, yeast.", asked.id)]
    assert messages[1].params == {"max_new_tokens": 64} and messages[1].state == "complete"
    # A second answer to the same prompt branches; the thread follows the newest branch.
    retry = history.add_message(first.id, "assistant", "Knead it.", parent_id=asked.id, state="cancelled")
    assert [msg.id for msg in history.thread(first.id)] == [asked.id, retry.id]
    assert answer.id in [msg.id for msg in history.messages(first.id)]
    history.update_conversation(first.id, title="Bread")
    assert history.conversation(first.id).title == "Bread"  # type: ignore[union-attr]
    history.delete_conversation(second.id)
    assert history.conversation(second.id) is None and history.messages(second.id) == []
    with pytest.raises(ValueError):
        history.add_message(first.id, "system", "no")
    with pytest.raises(ValueError):
        history.add_message(first.id, "assistant", "no", state="done")


def test_the_store_is_in_wal_mode_and_private(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite"
    ChatHistory(path)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert path.stat().st_mode & 0o777 == 0o600


def test_two_processes_write_one_store_at_once(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite"
    history = ChatHistory(path)
    conversation = history.new_conversation("shared")
    code = (
        "import sys\n"
        "from oatui.chat.history import ChatHistory\n"
        "h = ChatHistory(sys.argv[1])\n"
        "for i in range(150):\n"
        "    h.add_message(int(sys.argv[2]), 'assistant', f'other {i}')\n"
        "    h.conversations()\n"
    )
    other = subprocess.Popen([sys.executable, "-c", code, str(path), str(conversation.id)])
    for i in range(150):
        history.add_message(conversation.id, "prompter", f"mine {i}")
        history.messages(conversation.id)
    assert other.wait(timeout=120) == 0
    texts = [message.text for message in history.messages(conversation.id)]
    assert len(texts) == 300 and texts.count("other 149") == 1 and texts.count("mine 149") == 1


def test_a_store_from_a_newer_oatui_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite"
    ChatHistory(path)
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version=99")
    connection.close()
    with pytest.raises(ValueError, match="newer oatui"):
        ChatHistory(path)
