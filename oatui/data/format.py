"""The Open-Assistant v2 chat format and its tokenization with an assistant-token mask.

``<|system|>SYS<|endoftext|><|prompter|>Q<|endoftext|><|assistant|>A<|endoftext|>...``: the model
family's EOS token takes the place of ``<|endoftext|>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

PROMPTER = "<|prompter|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
DEFAULT_EOS = "<|endoftext|>"
PAD = "<|padding|>"
ROLE_TOKENS = {"prompter": PROMPTER, "assistant": ASSISTANT, "system": SYSTEM}
SPECIAL_TOKENS = (PROMPTER, ASSISTANT, SYSTEM)


class TurnLike(Protocol):
    role: str
    text: str


class Tokenizer(Protocol):
    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...


def segments(
    turns: Sequence[TurnLike | tuple[str, str]],
    eos: str = DEFAULT_EOS,
    system: str | None = None,
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """The conversation as ``(text, trains)`` pieces: ``trains`` marks assistant text and its EOS.

    Role markers and everything the prompter or the system says never carry loss.
    """
    pieces: list[tuple[str, bool]] = []
    if system:
        pieces.append((f"{SYSTEM}{system}{eos}", False))
    for turn in turns:
        role, text = (turn if isinstance(turn, tuple) else (turn.role, turn.text))
        if role == "assistant":
            pieces.append((ASSISTANT, False))
            pieces.append((f"{text}{eos}", True))
        elif role == "prompter":
            pieces.append((f"{PROMPTER}{text}{eos}", False))
        elif role == "system":
            pieces.append((f"{SYSTEM}{text}{eos}", False))
        else:
            raise ValueError(f"unknown role {role!r}")
    if add_generation_prompt:
        pieces.append((ASSISTANT, False))
    return pieces


def format_conversation(
    turns: Sequence[TurnLike | tuple[str, str]],
    eos: str = DEFAULT_EOS,
    system: str | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as one string; with ``add_generation_prompt`` it ends with ``<|assistant|>``."""
    return "".join(text for text, _ in segments(turns, eos, system, add_generation_prompt))


def tokenize_with_mask(
    tokenizer: Tokenizer,
    pieces: Sequence[tuple[str, bool]],
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask of the tokens that train (assistant text + EOS).

    Pieces are tokenized one by one: the role markers are special tokens that split the text
    anyway, so this gives the same ids as tokenizing the joined string.
    """
    ids: list[int] = []
    mask: list[int] = []
    for text, trains in pieces:
        piece_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece_ids)
        mask.extend([1 if trains else 0] * len(piece_ids))
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask
