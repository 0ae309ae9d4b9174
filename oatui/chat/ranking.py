"""Putting sampled answers in order from the keyboard: the small language both UIs share.

``2 1 3`` orders three answers best first; ``!3`` rejects answer 3 as unusable (``2 1 !3``);
with fewer than ten answers the digits may be run together (``213``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oatui.chat.feedback import RankedAnswer

HELP = "order best first, e.g. '2 1 3'; '!N' rejects answer N; 'eN' edits answer N; 's' skips"


@dataclass(frozen=True)
class Order:
    ranked: tuple[int, ...]
    """0-based answer indices, best first."""
    rejected: tuple[int, ...]


def parse_order(text: str, count: int) -> Order:
    """Read an ordering of ``count`` answers; ``ValueError`` with a one-line reason otherwise."""
    tokens = text.replace(",", " ").split()
    if len(tokens) == 1 and count < 10 and tokens[0].isdigit() and len(tokens[0]) == count:
        tokens = list(tokens[0])
    ranked: list[int] = []
    rejected: list[int] = []
    for token in tokens:
        reject = token.startswith("!")
        number = token[1:] if reject else token
        if not number.isdigit() or not 1 <= int(number) <= count:
            raise ValueError(f"{token!r}: expected an answer number from 1 to {count}")
        index = int(number) - 1
        if index in ranked or index in rejected:
            raise ValueError(f"answer {index + 1} is listed twice")
        (rejected if reject else ranked).append(index)
    missing = [i + 1 for i in range(count) if i not in ranked and i not in rejected]
    if missing:
        raise ValueError(f"place every answer: {', '.join(map(str, missing))} missing")
    if not ranked:
        raise ValueError("every answer was rejected: keep at least one")
    return Order(tuple(ranked), tuple(rejected))


def ranked_answers(texts: Sequence[str], order: Order, edits: dict[int, str] | None = None,
                   seeds: Sequence[int | None] | None = None) -> list[RankedAnswer]:
    """Answers best first (rejected ones last), with edits applied."""
    edits = edits or {}
    answers = []
    for index in [*order.ranked, *order.rejected]:
        text = edits.get(index, texts[index])
        answers.append(RankedAnswer(
            text=text,
            rejected=index in order.rejected,
            edited_from=texts[index] if index in edits and edits[index] != texts[index] else None,
            seed=seeds[index] if seeds else None,
        ))
    return answers
