"""Token-by-token generation with a KV cache, and incremental detokenization for streaming.

``generate_ids`` is the plain loop for one sequence (its cache needs no padding or attention mask);
``BatchedGenerator`` decodes many at once, a new request joining the running batch at the next
step, and is what the Triton policy model runs. Both pick tokens with the same ``next_token``, so
an answer is the same from either (greedy token for token, sampled with the same seed).
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


def parse_request_parameters(values: Mapping[str, Any]) -> tuple[SamplingParams, float | None]:
    """Sampling parameters and the streaming interval in seconds, from a request's parameters.

    ``stream_interval_ms``: after the first piece (sent at once), pieces that come sooner than this
    after the previous response are sent together. A token every few milliseconds (a small model)
    then costs one response per group instead of one each; a large model, slower than the
    interval, still sends every token on its own. 0 sends every piece separately. Not given
    (None here): 10 ms, longer while many requests run (:func:`spacing`).
    """
    values = dict(values)
    interval = values.pop(STREAM_INTERVAL_KEY, None)
    if interval is None:
        return SamplingParams.from_mapping(values), None
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 10_000:
        raise ValueError(f"{STREAM_INTERVAL_KEY} must be a number of milliseconds in [0, 10000], got {interval!r}")
    return SamplingParams.from_mapping(values), float(interval) / 1000


#: Round trips to the server per second that a served policy spends, in all, on cancellation checks
#: and on the responses of requests that leave ``stream_interval_ms`` to it. Each costs the model's
#: process about 0.1 ms; with one request per row of a batch of a small model, asked every 10 ms
#: for each row, they took about a fifth of the process's time at 8 rows.
ROUND_TRIPS_PER_SECOND = 200.0


def spacing(interval: float, rows: int) -> float:
    """``interval`` (seconds) while ``rows`` requests fit in :data:`ROUND_TRIPS_PER_SECOND` with it;
    longer when they do not (up to 2 rows: 10 ms stays 10 ms; 8 rows: 40 ms)."""
    return max(interval, rows / ROUND_TRIPS_PER_SECOND)


class ThrottledCheck:
    """``check()`` at most once per ``interval`` seconds; its last answer in between.

    The Python backend's ``is_cancelled()`` is a round trip to the server process (~0.1 ms on a
    busy CPU): asked before every token of a small model it costs more than the token itself.
    Asked at most every 10 ms, a cancelled request still stops within 10 ms plus one token.
    ``interval`` may be changed between calls (the policy spaces its checks by the batch's size).
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
        return self.take()

    def add(self, token: int) -> None:
        """Take ``token`` without decoding yet (:meth:`take` decodes all added since, at once)."""
        self.ids.append(token)

    def take(self) -> str:
        """The text new since the last piece, or "" while it would end in a split character."""
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


# ---------------------------------------------------------------------------------------------
# Parameters in Triton's LLM conventions (those of its vLLM backend)

LLM_PARAMETER_NAMES = {"max_tokens": "max_new_tokens"}
_INT_KEYS = ("max_new_tokens", "top_k", "seed")
_FLOAT_KEYS = ("temperature", "top_p", "repetition_penalty", STREAM_INTERVAL_KEY)


def translate_llm_parameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """oatui's parameter names and types from the vLLM backend's (``sampling_parameters``).

    ``max_tokens`` is ``max_new_tokens``; ``top_k`` -1 (vLLM's "off") is 0; numbers and booleans
    sent as strings (as the vLLM backend's sample client does: ``{"temperature": "0.1"}``) are
    read as such. ``stop`` may list the role markers (oatui's policy stops at them anyway); other
    stop strings are refused. oatui's own names pass through unchanged.
    """
    from oatui.data.format import SPECIAL_TOKENS

    values = dict(values)
    stop = values.pop("stop", None)
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(item, str) and item in SPECIAL_TOKENS for item in stop):
            raise ValueError(f"stop: only the role markers {', '.join(SPECIAL_TOKENS)} are stop strings here "
                             f"(generation also ends at EOS), got {stop!r}")
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in values.items():
        name = LLM_PARAMETER_NAMES.get(key, key)
        if name in out:
            raise ValueError(f"give one of {given[name]!r} and {key!r}, not both")
        given[name] = key
        if isinstance(value, str):
            text = value.strip()
            try:
                if name in _INT_KEYS:
                    value = int(text)
                elif name in _FLOAT_KEYS:
                    value = float(text)
                elif name == "ignore_eos" and text.lower() in ("true", "false"):
                    value = text.lower() == "true"
            except ValueError:
                pass  # left as the string: the check below names the parameter
        if name == "top_k" and value == -1:
            value = 0
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Batched decoding: requests that overlap in time are decoded together


@dataclass(eq=False)
class GenerationRequest:
    """One request inside :class:`BatchedGenerator`.

    ``on_token(token)`` is called with each new token id, ``on_end(reason, error)`` once at the end
    (``reason``: ``stop`` (EOS or a role marker), ``length`` (max_new_tokens or the context),
    ``cancelled`` or ``error``). Both are called on the generator's thread. ``should_stop`` is asked
    before every step this sequence takes part in.
    """

    prompt_ids: list[int]
    params: SamplingParams
    on_token: Callable[[int], None]
    on_end: Callable[[str, "BaseException | None"], None]
    should_stop: Callable[[], bool] | None = None
    # Filled in by the generator.
    budget: int = 0
    generated: int = 0
    pending: int | None = None  # sampled, not yet in the cache
    generator: "torch.Generator | None" = None
    history: "torch.Tensor | None" = None
    submitted: float = 0.0

    @property
    def reserved_tokens(self) -> int:
        """Cache positions this sequence may come to hold: its prompt plus its whole budget."""
        return len(self.prompt_ids) + self.budget


class BatchedGenerator:
    """Continuous batching for a Hugging Face causal LM, one decode step at a time.

    A submitted sequence waits in a queue until there is room (``max_batch`` rows and
    ``max_tokens_in_flight`` reserved cache positions; one sequence alone is always admitted), is
    prefilled on its own, and joins the running batch at the next step: its KV cache is left-padded
    to the batch's length (or the batch's to its own) and stacked, with an attention mask over the
    padding and each row's own position ids, so a row computes what it would compute alone. A
    finished or cancelled row leaves at once; the padding nobody needs any more is cut.

    The cache of a model whose layers all attend over the whole context lives in buffers with
    spare rows and columns (``RoomyLayer``, from :func:`roomy_layer_class`): the batch is their first
    rows and a range of columns. A step writes its tokens' keys and values in place (where
    ``DynamicLayer`` copies the whole cache at every step); a newcomer is written into the next free
    rows; a row that leaves is filled by the last row; padding that no row needs is cut by moving
    the range's start. The whole cache is copied only when the buffers are out of rows or columns, or
    a newcomer's prompt is longer than every running row.
    The attention mask and the positions are kept the same way. Other caches (sliding windows and
    the like) are stacked and selected as ``DynamicCache`` tensors.

    Each row samples with its own parameters and its own ``torch.Generator`` (seeded when the
    request gives a seed), so a seeded answer is the same alone or batched, and a greedy one is
    the same token for token.

    One thread owns it: it calls :meth:`submit`, :meth:`step` and :meth:`cancel_all` (the policy's
    engine process does, between the messages it reads).
    """

    def __init__(self, model: "PreTrainedModel", stop_ids: set[int], vocab_size: int, limit: int,
                 max_batch: int = 16, max_tokens_in_flight: int = 32768) -> None:
        from collections import deque

        if max_batch < 1 or max_tokens_in_flight < 1:
            raise ValueError("max_batch and max_tokens_in_flight must be at least 1")
        self.model = model
        self.stop_ids = stop_ids
        self.vocab_size = vocab_size
        self.limit = limit
        self.max_batch = max_batch
        self.max_tokens_in_flight = max_tokens_in_flight
        self.device = next(model.parameters()).device
        self.waiting: deque[GenerationRequest] = deque()
        self.running: list[GenerationRequest] = []
        self.cache: Any = None  # DynamicCache of the running rows, left-padded
        self.slots = False  # whether its layers are RoomyLayers (else DynamicCache tensors of the batch's size)
        # Rows x columns, True = a real position; the running rows are the first ones, the batch's
        # columns start:end. Past end it is True already, as every step adds a real position to every row.
        self.mask_buffer: "torch.Tensor | None" = None
        self.position_buffer: "torch.Tensor | None" = None  # rows x 1: each row's real positions so far
        self.start = self.end = 0
        self.padded = False  # whether some running row has padding on its left
        self.sdpa_padding_mask = _padding_mask_is_sdpa_mask(model.config)
        # Counters for metrics and tests.
        self.steps = 0
        self.max_rows_seen = 0

    # -- queue --------------------------------------------------------------------------------

    def submit(self, sequence: GenerationRequest) -> GenerationRequest:
        sequence.budget = max(0, min(sequence.params.max_new_tokens, self.limit - len(sequence.prompt_ids)))
        sequence.submitted = time.perf_counter()
        self.waiting.append(sequence)
        return sequence

    @property
    def width(self) -> int:
        """The cache's length: real positions of the longest row (the others padded on the left)."""
        return self.end - self.start

    @property
    def mask(self) -> "torch.Tensor | None":
        """The running rows' attention mask (rows x cache length, True = a real position), or None."""
        return None if self.mask_buffer is None else self.mask_buffer[: len(self.running), self.start : self.end]

    @property
    def positions(self) -> "torch.Tensor | None":
        """Each running row's next position (its real positions so far), rows x 1, or None."""
        return None if self.position_buffer is None else self.position_buffer[: len(self.running)]

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def tokens_in_flight(self) -> int:
        return sum(s.reserved_tokens for s in self.running)

    def cancel_all(self) -> None:
        """End every running and waiting request as cancelled, and drop the batch."""
        for sequence in [*self.running, *self.waiting]:
            self._end(sequence, "cancelled")
        self._clear()
        self.waiting.clear()

    # -- one step -----------------------------------------------------------------------------

    def step(self, admitted: Callable[[], None] | None = None) -> None:
        """Admit what fits, then one decode step for every running row.

        ``admitted`` is called between the two, so the newcomers' first tokens need not wait for
        the step."""
        import torch

        with torch.inference_mode():
            self._admit()
            if admitted is not None:
                admitted()
            self.max_rows_seen = max(self.max_rows_seen, len(self.running))
            if self.running:
                self._decode()
                self.steps += 1

    def _end(self, sequence: GenerationRequest, reason: str, error: BaseException | None = None) -> None:
        try:
            sequence.on_end(reason, error)
        except Exception:  # noqa: BLE001 - one request's callback must not stop the others
            pass

    def _deliver(self, sequence: GenerationRequest, token: int) -> str | None:
        """Hand ``token`` over; the reason the sequence ends here, or None."""
        if token in self.stop_ids and not sequence.params.ignore_eos:
            return "stop"
        sequence.generated += 1
        try:
            sequence.on_token(token)
        except Exception as error:  # noqa: BLE001 - e.g. the client went away: end this one only
            return f"error:{error}"
        if sequence.generated >= sequence.budget:
            return "length"
        sequence.pending = token
        if sequence.params.repetition_penalty != 1.0:
            assert sequence.history is not None
            sequence.history = torch_cat_one(sequence.history, token)
        return None

    def _admit(self) -> None:
        """Prefill what fits from the queue, as one left-padded batch, and join the running rows."""
        import torch

        group: list[GenerationRequest] = []
        reserved = self.tokens_in_flight
        while self.waiting and len(self.running) + len(group) < self.max_batch:
            candidate = self.waiting[0]
            if (self.running or group) and reserved + candidate.reserved_tokens > self.max_tokens_in_flight:
                break
            self.waiting.popleft()
            group.append(candidate)
            reserved += candidate.reserved_tokens
        ready = []
        for candidate in group:
            if candidate.should_stop is not None and candidate.should_stop():
                self._end(candidate, "cancelled")
            elif candidate.budget < 1:
                self._end(candidate, "length")
            else:
                ready.append(candidate)
        if not ready:
            return
        width = max(len(c.prompt_ids) for c in ready)
        ids = torch.zeros((len(ready), width), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(ready), width), dtype=torch.long, device=self.device)
        for row, candidate in enumerate(ready):
            ids[row, width - len(candidate.prompt_ids):] = torch.tensor(candidate.prompt_ids, dtype=torch.long)
            mask[row, width - len(candidate.prompt_ids):] = 1
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                             use_cache=True, logits_to_keep=1)
        except Exception as error:  # noqa: BLE001 - these requests fail, the running batch goes on
            for candidate in ready:
                self._end(candidate, "error", error)
            return
        joined: list[GenerationRequest] = []
        rows = []
        for row, candidate in enumerate(ready):
            try:
                if candidate.params.seed is not None:
                    candidate.generator = torch.Generator(device=self.device)
                    candidate.generator.manual_seed(candidate.params.seed)
                candidate.history = ids[row, width - len(candidate.prompt_ids):]
                token = next_token(out.logits[row, -1], candidate.params, candidate.history, candidate.generator,
                                   self.vocab_size)
            except Exception as error:  # noqa: BLE001
                self._end(candidate, "error", error)
                continue
            reason = self._deliver(candidate, token)
            if reason is not None:
                self._finish(candidate, reason)
            else:
                joined.append(candidate)
                rows.append(row)
        if joined:
            cache = out.past_key_values
            if len(rows) != len(ready):
                cache.batch_select_indices(torch.tensor(rows, dtype=torch.long, device=self.device))
                mask = mask[rows]
            self._join(joined, cache, mask)

    def _finish(self, sequence: GenerationRequest, reason: str) -> None:
        if reason.startswith("error:"):
            self._end(sequence, "error", RuntimeError(reason[len("error:"):]))
        else:
            self._end(sequence, reason)

    def _join(self, sequences: list[GenerationRequest], cache: Any, mask: "torch.Tensor") -> None:
        """Add prefilled rows (``cache``, ``mask``: left-padded among themselves) after the running
        ones, right-aligned to the batch's columns, the shorter side padded on the left."""
        import torch
        from transformers import DynamicCache

        mask = mask.bool()
        rows, added, length = len(self.running), mask.shape[0], mask.shape[1]
        prefilled = list(cache.layers)
        if self.cache is None:
            self.slots = self._fits_slots(prefilled)
            if self.slots:  # empty buffers, in the prefill's DynamicCache: made to measure below
                roomy = roomy_layer_class()
                cache.layers = [roomy(layer.keys[:0, :, :0], layer.values[:0, :, :0], 0, 0, 0) for layer in prefilled]
                self.cache = cache
            self.mask_buffer = mask.new_ones((0, 0))
            self.position_buffer = torch.zeros((0, 1), dtype=torch.long, device=self.device)
            self.start = self.end = 0
        capacity = self.mask_buffer.shape[0]
        if rows + added > capacity or length > self.width:
            if rows + added > capacity:  # twice the rows, up to the batch's limit: a few copies while it fills
                capacity = min(self.max_batch, max(rows + added, 2 * capacity))
            self._reshape(capacity, max(self.width, length))
        if self.slots:
            for layer, new in zip(self.cache.layers, prefilled):
                layer.put(rows, new.keys, new.values)
        else:
            # Stacked: the running rows' tensors over the newcomers', each right-aligned to the width.
            olds = self.cache.layers if self.cache is not None else [None] * len(prefilled)
            self.cache = DynamicCache(ddp_cache_data=[
                (_stack_left_padded([*_tensors(old, "keys"), new.keys], self.width),
                 _stack_left_padded([*_tensors(old, "values"), new.values], self.width))
                for old, new in zip(olds, prefilled)], config=self.model.config)
        self.mask_buffer[rows : rows + added, self.start : self.end - length] = False
        self.mask_buffer[rows : rows + added, self.end - length : self.end] = mask
        self.mask_buffer[rows : rows + added, self.end :] = True
        self.position_buffer[rows : rows + added] = mask.sum(dim=1, keepdim=True)
        self.running.extend(sequences)
        self._trim()

    @staticmethod
    def _fits_slots(layers: list[Any]) -> bool:
        """Whether a prefill's cache layers can live in RoomyLayers: plain DynamicLayers (full attention)."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in layers)

    def _reshape(self, rows: int, width: int) -> None:
        """New buffers of ``rows`` rows and ``width`` columns plus room: the running rows keep their
        places and end at column ``width``, padded on the left (the only copy of the whole cache)."""
        running, room = len(self.running), _room(width)
        assert self.mask_buffer is not None and self.position_buffer is not None
        if self.slots:
            for layer in self.cache.layers:
                layer.adopt(_placed(layer.keys, rows, width, room), _placed(layer.values, rows, width, room), running,
                            0, width)
        # (DynamicCache tensors are padded out to the width when they are stacked.)
        mask = self.mask_buffer.new_ones((rows, width + room))
        mask[:running, :width] = _placed(self.mask, running, width, 0)
        positions = self.position_buffer.new_zeros((rows, 1))
        positions[:running] = self.positions
        self.mask_buffer, self.position_buffer, self.start, self.end = mask, positions, 0, width

    def _trim(self) -> None:
        """Cut the columns on the left that are padding in every running row.

        A row's real positions are the last ``positions`` columns of the batch's (prefill pads on the
        left, joins pad on the left, steps add on the right)."""
        positions = self.positions
        assert positions is not None
        longest, shortest = int(positions.max()), int(positions.min())
        cut = self.width - longest
        if cut:
            self.start += cut
            for layer in self.cache.layers:
                if self.slots:
                    layer.view(len(self.running), self.start, self.end)
                else:
                    layer.keys = layer.keys[:, :, cut:]
                    layer.values = layer.values[:, :, cut:]
        self.padded = shortest != longest  # steps add a real position to every row: so it stays until rows change

    def _widen(self) -> None:
        """Room for one more column (a decode step): the cache writes it, the mask has it already."""
        assert self.mask_buffer is not None
        if self.end == self.mask_buffer.shape[1]:
            self._reshape(self.mask_buffer.shape[0], self.width)
        self.end += 1

    def _clear(self) -> None:
        self.running, self.cache, self.mask_buffer, self.position_buffer = [], None, None, None
        self.start = self.end = 0
        self.padded = False

    def _decode(self) -> None:
        import torch

        assert self.mask is not None
        # Cancellation first: a cancelled row does not take the step.
        keep = []
        for sequence in self.running:
            if sequence.should_stop is not None and sequence.should_stop():
                self._end(sequence, "cancelled")
            else:
                keep.append(sequence)
        if len(keep) != len(self.running):
            self._select(keep)
            if not self.running:
                return
        input_ids = torch.tensor([[s.pending] for s in self.running], dtype=torch.long, device=self.device)
        self._widen()
        attention_mask = None  # no padding: one new token per row sees the whole cache
        if self.padded:
            attention_mask = self.mask
            if self.sdpa_padding_mask:
                # For one new token per row, the mask transformers builds for SDPA from the 2-D mask
                # (each step, in Python: ~0.1 ms at 8 rows on a CPU) is the padding mask itself.
                attention_mask = attention_mask[:, None, None, :]
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=self.positions,
                             past_key_values=self.cache, use_cache=True)
        except Exception as error:  # noqa: BLE001 - every running request gets the error
            for sequence in self.running:
                self._end(sequence, "error", error)
            self._clear()
            return
        self.cache = out.past_key_values
        self.positions.add_(1)
        logits = out.logits[:, -1]
        # Plain greedy rows in one argmax (what next_token does for each: the same first maximum).
        greedy = logits[:, : self.vocab_size].argmax(dim=-1).tolist()
        keep = []
        for row, sequence in enumerate(self.running):
            params = sequence.params
            try:
                if params.temperature == 0 and params.repetition_penalty == 1.0:
                    token = greedy[row]
                else:
                    token = next_token(logits[row], params, sequence.history, sequence.generator, self.vocab_size)
            except Exception as error:  # noqa: BLE001
                self._end(sequence, "error", error)
                continue
            reason = self._deliver(sequence, token)
            if reason is None:
                keep.append(sequence)
            else:
                self._finish(sequence, reason)
        if len(keep) != len(self.running):
            self._select(keep)

    def _select(self, keep: list[GenerationRequest]) -> None:
        """Keep only these rows: the last kept rows move into the places of those that leave."""
        import torch

        if not keep:
            self._clear()
            return
        index = {id(s): row for row, s in enumerate(self.running)}
        count = len(keep)
        kept = {index[id(s)] for s in keep}
        holes = [row for row in range(count) if row not in kept]
        movers = sorted(row for row in kept if row >= count)
        order = list(range(count))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            target = torch.tensor(holes, dtype=torch.long, device=self.device)
            source = torch.tensor(movers, dtype=torch.long, device=self.device)
            assert self.mask_buffer is not None and self.position_buffer is not None
            self.mask_buffer[target] = self.mask_buffer[source]
            self.position_buffer[target] = self.position_buffer[source]
            if self.slots:
                for layer in self.cache.layers:
                    layer.move(target, source)
        if not self.slots:
            self.cache.batch_select_indices(torch.tensor(order, dtype=torch.long, device=self.device))
        self.running = [self.running[row] for row in order]
        if self.slots:
            for layer in self.cache.layers:
                layer.view(count, self.start, self.end)
        self._trim()


def _padding_mask_is_sdpa_mask(config: Any) -> bool:
    """Whether a decode step may hand the model its padding mask as SDPA's 4-D boolean mask.

    True for causal models on SDPA whose layers all attend over the whole context (no sliding
    window, no chunks): there, for one query per row at the end, the causal part masks nothing
    and transformers' mask is the padding mask. Other models get the 2-D mask, as before.
    """
    if getattr(config, "_attn_implementation", None) != "sdpa" or not getattr(config, "is_causal", True):
        return False
    if getattr(config, "sliding_window", None) is not None or getattr(config, "attention_chunk_size", None):
        return False
    return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())


def torch_cat_one(history: "torch.Tensor", token: int) -> "torch.Tensor":
    import torch

    return torch.cat([history, torch.tensor([token], dtype=history.dtype, device=history.device)])


def _tensors(layer: Any, name: str) -> "list[torch.Tensor]":
    """The layer's tensor ``name`` (keys or values) as a list: empty for an empty batch (None)."""
    return [] if layer is None else [getattr(layer, name)]


MIN_ROOM = 32  # cache columns a buffer keeps free at least: one reallocation per 32 steps or fewer


def _room(width: int) -> int:
    """Free columns for a buffer of ``width`` used ones: at least MIN_ROOM, half the width for long
    contexts (a copy per growth, amortized over as many steps)."""
    return max(MIN_ROOM, width // 2)


def _stack_left_padded(parts: "list[torch.Tensor]", width: int, room: int = 0,
                       rows: int | None = None) -> "torch.Tensor":
    """``parts`` stacked along dim 0 in a new zero tensor of ``rows`` rows (default: theirs), each
    right-aligned to column ``width`` of the sequence axis (dim 2 of a cache tensor, dim 1 of a
    mask), with ``room`` columns after."""
    axis = 2 if parts[0].dim() == 4 else 1
    shape = list(parts[0].shape)
    shape[0] = sum(part.shape[0] for part in parts) if rows is None else rows
    shape[axis] = width + room
    out = parts[0].new_zeros(shape)
    row = 0
    for part in parts:
        length = part.shape[axis]
        out[row : row + part.shape[0]].narrow(axis, width - length, length).copy_(part)
        row += part.shape[0]
    return out


def _placed(tensor: "torch.Tensor", rows: int, width: int, room: int) -> "torch.Tensor":
    """``tensor`` in the first rows of a new zero tensor of ``rows`` rows, ending at column ``width``,
    with ``room`` columns after."""
    return _stack_left_padded([tensor], width, room, rows)


_ROOMY_LAYER: Any = None


def roomy_layer_class() -> Any:
    """``RoomyLayer``, a ``DynamicLayer`` in buffers with spare rows and columns (made on first use,
    as transformers is imported only when a model runs)."""
    global _ROOMY_LAYER
    if _ROOMY_LAYER is not None:
        return _ROOMY_LAYER
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """Keys and values of a full-attention layer: rows ``:rows`` and columns ``start:end`` of
        buffers with spare rows and columns (``keys``/``values`` are those views).

        ``update`` writes the new columns in place; ``BatchedGenerator`` places, moves and cuts rows
        (``put``, ``move``, ``view``) and makes room before a step (``adopt`` of larger buffers). Only
        it changes them: DynamicLayer's own edits (``batch_select_indices``, ``crop``) would not.
        """

        def __init__(self, key_buffer: "torch.Tensor", value_buffer: "torch.Tensor", rows: int, start: int,
                     end: int) -> None:
            super().__init__()
            self.adopt(key_buffer, value_buffer, rows, start, end)

        def adopt(self, key_buffer: "torch.Tensor", value_buffer: "torch.Tensor", rows: int, start: int,
                  end: int) -> None:
            self.key_buffer, self.value_buffer = key_buffer, value_buffer
            self.dtype, self.device, self.is_initialized = key_buffer.dtype, key_buffer.device, True
            self.view(rows, start, end)

        def view(self, rows: int, start: int, end: int) -> None:
            self.rows, self.start, self.end = rows, start, end
            self.keys = self.key_buffer[:rows, :, start:end]
            self.values = self.value_buffer[:rows, :, start:end]

        def update(self, key_states: "torch.Tensor", value_states: "torch.Tensor", *args: Any,
                   **kwargs: Any) -> "tuple[torch.Tensor, torch.Tensor]":
            end = self.end + key_states.shape[-2]  # within the room: BatchedGenerator makes it before a step
            self.key_buffer[: self.rows, :, self.end : end].copy_(key_states)
            self.value_buffer[: self.rows, :, self.end : end].copy_(value_states)
            self.view(self.rows, self.start, end)
            return self.keys, self.values

        def put(self, row: int, keys: "torch.Tensor", values: "torch.Tensor") -> None:
            """``keys``/``values`` (rows x heads x length x dim) into rows from ``row``, ending at
            column ``end``; their columns before are zeroed (padding)."""
            rows, length = row + keys.shape[0], keys.shape[2]
            for buffer, tensor in ((self.key_buffer, keys), (self.value_buffer, values)):
                buffer[row:rows, :, self.start : self.end - length].zero_()
                buffer[row:rows, :, self.end - length : self.end].copy_(tensor)
            self.view(rows, self.start, self.end)

        def move(self, target: "torch.Tensor", source: "torch.Tensor") -> None:
            """Rows ``source`` into rows ``target`` (the columns in use and the room)."""
            self.key_buffer[target] = self.key_buffer[source]
            self.value_buffer[target] = self.value_buffer[source]

    _ROOMY_LAYER = RoomyLayer
    return RoomyLayer
