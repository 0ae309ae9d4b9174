"""Where scores and reference log-probs come from: in-process models, or Triton servers.

Both sides compute with the same functions (``oatui.models.scoring.score_texts`` and
``token_logprobs``; the exported Triton models call them too), so a rollout scored on a server
gets the rewards it would get in-process. Remote calls are retried with exponential backoff
(``remote_retries`` attempts); when they still fail, :class:`RemoteFailure` ends the stage with
one line (after the trainer has saved a checkpoint).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

from oatui.data.datasets import rm_text
from oatui.errors import UserError
from oatui.models.scoring import rm_max_length, score_texts, token_logprobs
from oatui.serve.client import (
    ModelInterfaceError,
    RefLogprobClient,
    RemoteError,
    RetryPolicy,
    ScoreClient,
    ServerUnavailable,
    TritonAddress,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from oatui.train.ppo.rollout import Rollout

T = TypeVar("T")

MAX_BACKOFF_S = 30.0


class RemoteFailure(UserError):
    """A Triton server kept failing: the stage saves a checkpoint and ends with this one line."""


class RewardModel(Protocol):
    eos_token: str
    """The EOS of the reward model's tokenizer: its chat format ends each turn with it."""

    def score(self, texts: Sequence[str]) -> list[float]: ...


class Reference(Protocol):
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """B×(T−1) float32 on the CPU: log p_ref(ids[t+1] | ids[:t+1])."""
        ...


# --------------------------------------------------------------------------------------------
# In-process


class LocalRewardModel:
    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", batch_size: int = 16) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token = tokenizer.eos_token
        self.batch_size = batch_size
        self.max_length = rm_max_length(model, tokenizer)

    def score(self, texts: Sequence[str]) -> list[float]:
        return score_texts(self.model, self.tokenizer, texts, max_length=self.max_length, batch_size=self.batch_size)


class LocalReference:
    """A frozen causal LM, or with ``disable_adapter`` the LoRA policy itself with its adapter off."""

    def __init__(self, model: "PreTrainedModel", disable_adapter: bool = False) -> None:
        self.model = model
        self.disable_adapter = disable_adapter

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        context = self.model.disable_adapter() if self.disable_adapter else nullcontext()
        with context:
            return token_logprobs(self.model, input_ids.to(device), attention_mask.to(device)).float().cpu()


# --------------------------------------------------------------------------------------------
# On a Triton server


def call_with_retries(call: Callable[[], T], attempts: int, what: str, sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()`` under the clients' :class:`~oatui.serve.client.RetryPolicy`, patient: a server that
    does not answer (unreachable, timed out, model not ready) is retried with backoff 1, 2, 4, … s
    (at most 30 s); ``attempts`` tries in all.

    An error the server answered with (bad input, a crash in the model) is not retried.
    """
    policy = RetryPolicy(attempts=max(1, attempts), first=1.0, cap=MAX_BACKOFF_S, retry_on=(ServerUnavailable,))
    try:
        return policy.call(call, what, sleep=sleep)
    except ModelInterfaceError as error:  # not oatui's rm/ref model (an Open-Assistant to_triton one, say)
        raise RemoteFailure(f"{what}: {error}") from None
    except RemoteError as error:
        raise RemoteFailure(f"{what}: the server answered with an error: {error}") from None
    except ServerUnavailable as error:
        raise RemoteFailure(f"{what}: no answer after {policy.attempts} attempts: {error}") from None


class RemoteRewardModel:
    def __init__(self, address: str, eos_token: str, attempts: int, timeout: float) -> None:
        self.address = address
        self.eos_token = eos_token
        self.attempts = attempts
        # Retries and their backoff happen here, so that ``remote_retries`` bounds the whole call.
        self.client = ScoreClient(TritonAddress.parse(address), timeout=timeout, retries=0)

    def score(self, texts: Sequence[str]) -> list[float]:
        return call_with_retries(lambda: list(self.client.score(list(texts))), self.attempts,
                                 f"reward model on {self.address}")


class RemoteReference:
    def __init__(self, address: str, attempts: int, timeout: float) -> None:
        self.address = address
        self.attempts = attempts
        self.client = RefLogprobClient(TritonAddress.parse(address), timeout=timeout, retries=0)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids.cpu().numpy().astype("int64")
        mask = attention_mask.cpu().numpy().astype("int64")
        result = call_with_retries(lambda: self.client.logprobs(ids, mask), self.attempts,
                                   f"reference model on {self.address}")
        return torch.from_numpy(result).float()


def triton_host(kind: str, configured: str | None) -> str | None:
    """``TRITON_HOST_RM`` / ``TRITON_HOST_REF`` when set (as in Open-Assistant), else the config's value; checked."""
    variable = f"TRITON_HOST_{kind.upper()}"
    value = os.environ.get(variable) or configured
    source = f"${variable}" if os.environ.get(variable) else f"triton_host_{kind}"
    if not value:
        return None

    try:
        TritonAddress.parse(value)
    except ValueError as error:
        raise UserError(f"{source}: {value!r} is not host:grpcport/model ({error})") from None
    return value


# --------------------------------------------------------------------------------------------
# What the trainer asks for a rollout


def score_rollout(reward_model: RewardModel, rollout: "Rollout") -> torch.Tensor:
    """The reward model's score of each prompt + response, in the RM's own chat format (B, float32)."""
    texts = [rm_text(context, response, reward_model.eos_token)
             for context, response in zip(rollout.contexts, rollout.response_texts)]
    return torch.tensor(reward_model.score(texts), dtype=torch.float32)


def reference_logprobs(reference: Reference, rollout: "Rollout", chunk: int) -> torch.Tensor:
    """The reference model's log-probs of the response tokens (B×N, right padded like the response)."""
    start, width = rollout.prompt_width - 1, rollout.response_ids.shape[1]
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    rows = []
    for first in range(0, len(rollout), chunk):
        full = reference.logprobs(input_ids[first:first + chunk], attention_mask[first:first + chunk])
        rows.append(full[:, start:start + width])
    return torch.cat(rows)
