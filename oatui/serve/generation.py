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

    Each row samples with its own parameters and its own ``torch.Generator`` (seeded when the
    request gives a seed), so a seeded answer is the same alone or batched, and a greedy one is
    the same token for token.

    Call :meth:`step` in a loop on one thread (:meth:`run` does, until :meth:`stop`); :meth:`submit`
    may be called from any thread.
    """

    def __init__(self, model: "PreTrainedModel", stop_ids: set[int], vocab_size: int, limit: int,
                 max_batch: int = 16, max_tokens_in_flight: int = 32768) -> None:
        import threading
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
        self.mask: "torch.Tensor | None" = None  # running rows x cache length, 1 = a real position
        self.padded = False  # whether some running row has padding on its left
        self.sdpa_padding_mask = _padding_mask_is_sdpa_mask(model.config)
        self.condition = threading.Condition()
        self.stopped = False
        # Counters for metrics and tests.
        self.steps = 0
        self.max_rows_seen = 0

    # -- queue --------------------------------------------------------------------------------

    def submit(self, sequence: GenerationRequest) -> GenerationRequest:
        sequence.budget = max(0, min(sequence.params.max_new_tokens, self.limit - len(sequence.prompt_ids)))
        sequence.submitted = time.perf_counter()
        with self.condition:
            self.waiting.append(sequence)
            self.condition.notify()
        return sequence

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def tokens_in_flight(self) -> int:
        return sum(s.reserved_tokens for s in self.running)

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify_all()

    def run(self, after_step: Callable[[], None] | None = None) -> None:
        """Step until :meth:`stop`, sleeping while there is nothing to do.

        ``after_step`` is called after every step and before each sleep (the model's gauges).
        """
        while True:
            with self.condition:
                while not self.stopped and not self.waiting and not self.running:
                    if after_step is not None:
                        after_step()
                    self.condition.wait()
                if self.stopped:
                    break
            self.step()
            if after_step is not None:
                after_step()
        for sequence in [*self.running, *self.waiting]:
            self._end(sequence, "cancelled")
        self.running, self.cache, self.mask = [], None, None
        self.waiting.clear()

    # -- one step -----------------------------------------------------------------------------

    def step(self) -> None:
        """Admit what fits, then one decode step for every running row."""
        import torch

        with torch.inference_mode():
            self._admit()
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
        with self.condition:
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
        """Stack prefilled rows' cache under the running rows', left-padding the shorter."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if self.cache is None:
            self.cache, self.mask, self.running = cache, mask, list(sequences)
            self._trim()
            return
        assert self.mask is not None
        width = max(self.mask.shape[1], mask.shape[1])
        if all(type(layer) is DynamicLayer for layer in (*self.cache.layers, *cache.layers)):
            # Plain layers (full attention) hold nothing but keys and values: stacked in place, each
            # tensor built once (a new DynamicCache reads the config and copies every tensor again).
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = _stack_left_padded(old.keys, new.keys, width)
                old.values = _stack_left_padded(old.values, new.values, width)
        else:
            layers = [(_stack_left_padded(old.keys, new.keys, width), _stack_left_padded(old.values, new.values, width))
                      for old, new in zip(self.cache.layers, cache.layers)]
            self.cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        self.mask = _stack_left_padded(self.mask, mask, width)
        self.running.extend(sequences)
        self._trim()

    def _trim(self) -> None:
        """Cut the left columns that are padding in every running row."""
        assert self.mask is not None
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]
            self.mask = self.mask[:, start:]
        self.padded = not bool(self.mask.all())  # decode steps add columns of ones: it stays so until rows change

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
        positions = self.mask.sum(dim=1, keepdim=True)  # each row's own next position
        self.mask = torch.cat([self.mask, torch.ones((len(self.running), 1), dtype=torch.long, device=self.device)], dim=1)
        attention_mask = self.mask
        if self.padded and self.sdpa_padding_mask:
            # For one new token per row, the mask transformers builds for SDPA from the 2-D mask (each
            # step, in Python: ~0.1 ms at 8 rows on a CPU) is the padding mask itself, as booleans.
            attention_mask = self.mask.bool()[:, None, None, :]
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True)
        except Exception as error:  # noqa: BLE001 - every running request gets the error
            for sequence in self.running:
                self._end(sequence, "error", error)
            self.running, self.cache, self.mask = [], None, None
            return
        self.cache = out.past_key_values
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
        """Keep only these rows."""
        import torch

        if not keep:
            self.running, self.cache, self.mask = [], None, None
            return
        index = {id(s): row for row, s in enumerate(self.running)}
        rows = torch.tensor([index[id(s)] for s in keep], dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(rows)
        assert self.mask is not None
        self.mask = self.mask.index_select(0, rows)
        self.running = keep
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


def _stack_left_padded(top: "torch.Tensor", bottom: "torch.Tensor", width: int) -> "torch.Tensor":
    """``top`` over ``bottom`` (dim 0), each with zeros prepended along the sequence axis (dim 2 of a
    cache tensor, dim 1 of a mask) to ``width``."""
    axis = 2 if top.dim() == 4 else 1
    shape = list(top.shape)
    shape[0] += bottom.shape[0]
    shape[axis] = width
    out = top.new_zeros(shape)
    rows = top.shape[0]
    out[:rows].narrow(axis, width - top.shape[axis], top.shape[axis]).copy_(top)
    out[rows:].narrow(axis, width - bottom.shape[axis], bottom.shape[axis]).copy_(bottom)
    return out
