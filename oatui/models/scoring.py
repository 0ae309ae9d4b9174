"""Scoring with a reward model and per-token log-probs with a causal LM, the same everywhere.

The RL stage (in-process), the Triton model repository (``oatui export``) and the tests all call
these functions, so that a score or a log-prob served by Triton equals the in-process one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode_for_rm(
    tokenizer: "PreTrainedTokenizerBase", texts: Sequence[str], max_length: int
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Right-padded ids and mask; a text longer than ``max_length`` keeps its end (the reward is read there)."""
    import torch

    rows = [tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:] for text in texts]
    width = max(1, max(len(row) for row in rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return ids, mask


def reward_from_logits(logits: "torch.Tensor", attention_mask: "torch.Tensor") -> "torch.Tensor":
    """The classifier's output is already pooled at the last non-pad token: one float per row."""
    return logits[:, 0].float()


def score_texts(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    texts: Sequence[str],
    max_length: int = 512,
    batch_size: int = 16,
) -> list[float]:
    """Reward-model scores of conversation texts in the chat format (see ``oatui.data.datasets.rm_text``)."""
    import torch

    scores: list[float] = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            ids, mask = encode_for_rm(tokenizer, texts[start : start + batch_size], max_length)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            scores.extend(reward_from_logits(logits, mask).cpu().tolist())
    return scores


def token_logprobs(
    model: "PreTrainedModel",
    input_ids: "torch.Tensor",
    attention_mask: "torch.Tensor",
    temperature: float = 1.0,
) -> "torch.Tensor":
    """``out[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1])``: shape B×(T−1), float32.

    Positions are taken from the attention mask so that left-padded rows score like unpadded ones.
    Only the chosen tokens' log-probs leave this function, never the B×T×V logits.
    """
    import torch

    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, :-1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:].unsqueeze(-1)
    # log_softmax then gather: the full softmax stays inside this call.
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)


def rm_max_length(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", limit: int | None = None) -> int:
    """The longest input a reward model reads: the model's positions, the tokenizer's limit, ``limit``."""
    candidates = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None), limit]
    usable = [int(c) for c in candidates if isinstance(c, int) and 0 < c < 1_000_000]
    return min(usable) if usable else 2048
