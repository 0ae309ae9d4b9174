"""Streaming a served model's answer into the app: batched pieces, a quiet close, one-line errors.

Shared by the chat pane's answers and the rounds' answers (rank mode, blind A/B).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from oatui.app.messages import ChatSettings

#: Seconds between two batches of streamed text sent to the screen.
FLUSH_INTERVAL = 1 / 20
#: Seconds the client waits for each piece of an answer before it gives up on the server.
ANSWER_TIMEOUT = 60.0


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_line(error: BaseException) -> str:
    """An error in one line: its text, named by its type unless it is a plain ``ValueError`` or ``OSError``."""
    reason = one_line(str(error))
    return reason if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {reason}"


async def stream_in_batches(client: Any, context: list[tuple[str, str]], settings: ChatSettings,
                            pieces: list[str], emit: Callable[[str], None], **extra: Any) -> None:
    """Stream one answer into ``pieces``; ``emit`` gets the new text at most every ``FLUSH_INTERVAL``
    and whatever is left when the stream ends, however it ends (errors and cancellation propagate)."""
    pending: list[str] = []
    last_flush = 0.0
    try:
        async for piece in client.stream(turns=context, system=settings.system or None, **extra,
                                         **settings.sampling()):
            pieces.append(piece)
            pending.append(piece)
            now = time.monotonic()
            if now - last_flush >= FLUSH_INTERVAL:
                emit("".join(pending))
                pending.clear()
                last_flush = now
    finally:
        if pending:
            emit("".join(pending))


async def close_quietly(client: Any) -> None:
    """Close a chat client even while the worker is being cancelled."""
    if client is None:
        return
    try:
        await asyncio.shield(client.close())
    except BaseException:  # noqa: BLE001 - closing a cancelled channel
        pass
