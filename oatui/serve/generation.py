"""Token-by-token generation with a KV cache, and incremental detokenization for streaming.

The Triton policy model streams the pieces this loop yields; the benchmark runs the very same loop
in-process, so the two differ only by what Triton adds. One sequence at a time: a chat answer is
one request, and the cache of one sequence needs no padding or attention mask.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature`` 0 means greedy; ``top_k`` 0 means no top-k cut."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks, load tests)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "SamplingParams":
        """Checked values from request parameters; a bad one is a ValueError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            known.add(STREAM_INTERVAL_KEY)
            raise ValueError(f"unknown parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
        out: dict[str, Any] = {}
        for key, value in values.items():
            if key == "ignore_eos":
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false, got {value!r}")
                out[key] = value
            elif key in ("max_new_tokens", "top_k", "seed"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{key} must be an integer, got {value!r}")
                out[key] = value
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{key} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"{key} must be finite, got {value!r}")
                out[key] = float(value)
        params = cls(**out)
        params.check()
        return params

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or more, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be above 0, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")


STREAM_INTERVAL_KEY = "stream_interval_ms"
DEFAULT_STREAM_INTERVAL_MS = 10.0


def parse_request_parameters(values: Mapping[str, Any]) -> tuple[SamplingParams, float]:
    """Sampling parameters and the streaming interval in seconds, from a request's parameters.

    ``stream_interval_ms`` (default 10): after the first piece (sent at once), pieces that come sooner
    than this after the previous response are sent together. A token every few milliseconds (a
    small model) then costs one response per group instead of one each; a large model, slower
    than the interval, still sends every token on its own. 0 sends every piece separately.
    """
    values = dict(values)
    interval = values.pop(STREAM_INTERVAL_KEY, DEFAULT_STREAM_INTERVAL_MS)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 10_000:
        raise ValueError(f"{STREAM_INTERVAL_KEY} must be a number of milliseconds in [0, 10000], got {interval!r}")
    return SamplingParams.from_mapping(values), float(interval) / 1000


class ThrottledCheck:
    """``check()`` at most once per ``interval`` seconds; its last answer in between.

    The Python backend's ``is_cancelled()`` is a round trip to the server process (~0.1 ms on a
    busy CPU): asked before every token of a small model it costs more than the token itself.
    Asked at most every 10 ms, a cancelled request still stops within 10 ms plus one token.
    """

    def __init__(self, check: Callable[[], bool], interval: float) -> None:
        self.check = check
        self.interval = interval
        self.last: float | None = None
        self.answer = False

    def __call__(self) -> bool:
        now = time.perf_counter()
        if not self.answer and (self.last is None or now - self.last >= self.interval):
            self.answer = bool(self.check())
            self.last = now
        return self.answer


def stop_token_ids(tokenizer: "PreTrainedTokenizerBase") -> set[int]:
    """EOS, and the role markers: a new turn starting means the assistant's turn is over."""
    from oatui.data.format import SPECIAL_TOKENS

    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in SPECIAL_TOKENS if token in vocab)
    return {i for i in ids if i is not None}


def context_limit(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> int:
    """Positions the model can attend over (prompt plus answer)."""
    from oatui.models.scoring import rm_max_length

    return rm_max_length(model, tokenizer)


def next_token(
    logits: "torch.Tensor",
    params: SamplingParams,
    history: "torch.Tensor",
    generator: "torch.Generator | None",
    vocab_size: int,
) -> int:
    """One token id from the last position's logits (shape V), HF's processors in HF's order."""
    import torch

    logits = logits.float()
    if logits.shape[-1] > vocab_size:
        # Embedding rows past the tokenizer (padding to a multiple of 64) are not tokens.
        logits[vocab_size:] = -math.inf
    if params.repetition_penalty != 1.0 and history.numel():
        seen = logits.gather(0, history)
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits.scatter_(0, history, seen)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - params.top_p
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_ids(
    model: "PreTrainedModel",
    prompt_ids: list[int],
    params: SamplingParams,
    stop_ids: set[int],
    vocab_size: int,
    limit: int,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[int]:
    """New token ids one at a time, reusing the KV cache; a stop token ends the loop unyielded.

    ``should_stop`` is asked before each step (the caller's cancellation check). Generation also
    ends when prompt plus answer reach ``limit`` positions.
    """
    import torch

    device = next(model.parameters()).device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)
    budget = min(params.max_new_tokens, limit - len(prompt_ids))
    history = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    step_ids = history.unsqueeze(0)
    past = None
    with torch.inference_mode():
        for _ in range(max(0, budget)):
            if should_stop is not None and should_stop():
                return
            out = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = next_token(out.logits[0, -1], params, history, generator, vocab_size)
            if token in stop_ids and not params.ignore_eos:
                return
            yield token
            step_ids = torch.tensor([[token]], dtype=torch.long, device=device)
            if params.repetition_penalty != 1.0:
                history = torch.cat([history, step_ids[0]])


class IncrementalDecoder:
    """Text pieces from token ids as they come, never splitting a multi-byte character.

    Decodes a small window (the previous piece's tokens plus the new ones) and emits only what is
    new once it no longer ends in a replacement character, as text-generation servers do.
    """

    def __init__(self, tokenizer: "PreTrainedTokenizerBase") -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


def stream_text(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompt_ids: list[int],
    params: SamplingParams,
    should_stop: Callable[[], bool] | None = None,
    limit: int | None = None,
) -> Iterator[str]:
    """Decoded pieces of the answer to ``prompt_ids``; empty pieces (held-back bytes) are skipped."""
    decoder = IncrementalDecoder(tokenizer)
    for token in generate_ids(
        model,
        prompt_ids,
        params,
        stop_token_ids(tokenizer),
        len(tokenizer),
        limit if limit is not None else context_limit(model, tokenizer),
        should_stop,
    ):
        piece = decoder.push(token)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest
