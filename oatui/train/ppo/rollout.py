"""Rollouts: which prompts a step answers, left-padded batch generation, and the response mask.

A rollout batch holds, per row, the prompt (left padded, so that every response starts at the same
column) and the response (right padded). The response mask is 1 up to and including the first EOS
and 0 after it, so it is a contiguous prefix of each row, as the advantage kernel wants.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from oatui.data.format import format_conversation
from oatui.data.rules import Turn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Context = tuple[Turn, ...]


class PromptSchedule:
    """The prompts of each step, the same on every run: a seeded permutation per pass over the set.

    Step ``s`` (1-based) on rank ``r`` of ``w`` takes the ``batch_size`` prompts starting at global
    position ((s − 1)·w + r)·batch_size, so ranks never answer the same prompt in a step and the
    data position after step s is s·w·batch_size.
    """

    def __init__(self, prompts: Sequence[Context], seed: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if not prompts:
            raise ValueError("no prompts")
        self.prompts = list(prompts)
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.prompts)))
            random.Random(f"{self.seed}:prompts:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # one pass at a time is enough
        return self._orders[epoch]

    def position_after(self, step: int) -> int:
        return step * self.world_size * self.batch_size

    def batch(self, step: int) -> list[Context]:
        start = ((step - 1) * self.world_size + self.rank) * self.batch_size
        out = []
        for position in range(start, start + self.batch_size):
            epoch, index = divmod(position, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[index]])
        return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both B×max_len, padded on the left."""
    width = max(1, max(len(row) for row in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[index, width - len(row):] = 1
    return ids, mask


def response_mask_at_eos(response_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask B×N, has_eos B): 1 up to and including each row's first EOS, 0 after it; all 1 without EOS."""
    is_eos = response_ids == eos_id
    seen_before = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0  # an EOS strictly earlier
    return (~seen_before).long(), is_eos.any(dim=1)


def encode_prompts(contexts: Sequence[Context], tokenizer: "PreTrainedTokenizerBase", max_prompt_length: int) -> list[list[int]]:
    """The policy's prompt for each context, ending with ``<|assistant|>``; long ones keep their end."""
    rows = []
    for context in contexts:
        text = format_conversation(context, tokenizer.eos_token, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append(ids[-max_prompt_length:])
    return rows


@dataclass
class Rollout:
    contexts: list[Context]
    prompt_ids: torch.Tensor
    """B×P, left padded."""
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    """B×N, right padded: pad after the first EOS."""
    response_mask: torch.Tensor
    """B×N, 1 up to and including the first EOS."""
    has_eos: torch.Tensor
    response_texts: list[str]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def prompt_width(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]


def make_rollout(
    contexts: Sequence[Context],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    generated: torch.Tensor,
    tokenizer: "PreTrainedTokenizerBase",
) -> Rollout:
    """Cut the responses out of ``generate``'s output, mask them at the first EOS and decode them."""
    response_ids = generated[:, prompt_ids.shape[1]:].to("cpu")
    if response_ids.shape[1] == 0:
        raise RuntimeError("generation produced no tokens")
    mask, has_eos = response_mask_at_eos(response_ids, tokenizer.eos_token_id)
    width = int(mask.sum(dim=1).max())
    response_ids, mask = response_ids[:, :width], mask[:, :width]
    response_ids = torch.where(mask.bool(), response_ids, tokenizer.pad_token_id)
    texts = []
    for row, length, ended in zip(response_ids.tolist(), mask.sum(dim=1).tolist(), has_eos.tolist()):
        text_ids = row[: length - 1] if ended else row[:length]  # the RM's format adds the EOS back
        texts.append(tokenizer.decode(text_ids, skip_special_tokens=True))
    return Rollout(list(contexts), prompt_ids.cpu(), prompt_mask.cpu(), response_ids, mask, has_eos, texts)


@torch.no_grad()
def generate_rollout(
    policy: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    contexts: Sequence[Context],
    *,
    max_prompt_length: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    synced_gpus: bool = False,
    do_sample: bool = True,
) -> Rollout:
    """Sample one response per context (left-padded batch, stopping at EOS); greedy without ``do_sample``."""
    from transformers import GenerationConfig

    prompt_ids, prompt_mask = left_pad(encode_prompts(contexts, tokenizer, max_prompt_length), tokenizer.pad_token_id)
    device = next(policy.parameters()).device
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}
    settings: dict[str, Any] = dict(
        do_sample=do_sample,
        **sampling,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    generated = policy.generate(
        input_ids=prompt_ids.to(device),
        attention_mask=prompt_mask.to(device),
        generation_config=GenerationConfig(**settings),
        synced_gpus=synced_gpus,
    )
    return make_rollout(contexts, prompt_ids, prompt_mask, generated, tokenizer)
