"""The trained module: the policy (a causal LM, LoRA-wrapped or not) and its value estimates.

``value_model: policy`` puts a linear value head on the policy's own trunk (the last hidden state,
after the final norm): one network, one forward pass for log-probs and values, the memory of a
single model. ``value_model: rm`` trains a separate value network: the reward model's trunk with a
head initialised from the reward model's score head, so that V starts out as the RM's judgement
of each prefix; it costs a second trunk's memory and forward/backward time.

Both live in one ``ActorCritic`` module so that accelerate (DDP, DeepSpeed) sees a single model
with a single optimizer, and one forward returns both the logits and the values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from oatui.train.ppo.losses import gather_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from oatui.train.ppo.rollout import Rollout


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``oatui.models.scoring.token_logprobs`` does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        # Start at V = 0 everywhere: the first advantages are then the plain discounted rewards.
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


class ActorCritic(nn.Module):
    def __init__(self, policy: "PreTrainedModel", value_head: ValueHead, value_trunk: nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.value_trunk = value_trunk
        """None: the value head reads the policy's trunk."""

    def causal_lm(self) -> "PreTrainedModel":
        """The transformers model under a LoRA wrapper, or the policy itself."""
        get_base_model = getattr(self.policy, "get_base_model", None)
        return get_base_model() if callable(get_base_model) else self.policy

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, values) of the last ``logits_to_keep`` positions: B×K×V and B×K (float32)."""
        position_ids = position_ids_from_mask(attention_mask)
        if self.value_trunk is None:
            captured: dict[str, torch.Tensor] = {}

            def keep_hidden(module: nn.Module, args: Any, output: Any) -> None:
                captured["hidden"] = output[0]

            # The trunk's output is the last hidden state after the final norm, the LM head's input.
            hook = self.causal_lm().base_model.register_forward_hook(keep_hidden)
            try:
                output = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     logits_to_keep=logits_to_keep, use_cache=False)
            finally:
                hook.remove()
            hidden = captured["hidden"]
        else:
            output = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 logits_to_keep=logits_to_keep, use_cache=False)
            hidden = self.value_trunk(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=False)[0]
        values = self.value_head(hidden[:, -logits_to_keep:])
        return output.logits, values


def response_outputs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits B×N×V, log-probs B×N, values B×N) at the response tokens.

    The response starts at column P = T − N; the logits at column P − 1 + j predict response token
    j, and the value there is the state's before that token is chosen.
    """
    width = response_ids.shape[1]
    logits, values = model(input_ids, attention_mask, logits_to_keep=width + 1)
    logits, values = logits[:, :width], values[:, :width]
    return logits, gather_logprobs(logits, response_ids), values


@torch.no_grad()
def rollout_logprobs_and_values(model: nn.Module, rollout: "Rollout", chunk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout policy's log-probs and values of the responses (B×N each, on ``device``), ``chunk`` rows at a time."""
    logprobs, values = [], []
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    for start in range(0, len(rollout), chunk):
        rows = slice(start, start + chunk)
        _, row_logprobs, row_values = response_outputs(
            model, input_ids[rows].to(device), attention_mask[rows].to(device), rollout.response_ids[rows].to(device)
        )
        logprobs.append(row_logprobs)
        values.append(row_values)
    return torch.cat(logprobs), torch.cat(values)


def disable_dropout(model: nn.Module) -> None:
    """PPO's first ratio π/π_old must be exactly 1: no dropout anywhere, in training mode too."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def value_model_from_rm(reward_model: "PreTrainedModel") -> tuple[nn.Module, ValueHead]:
    """(trunk, head) for ``value_model: rm``: the RM's trunk, and a value head holding its score head's weights."""
    score = getattr(reward_model, "score", None)
    if not isinstance(score, nn.Linear) or score.out_features != 1:
        from oatui.errors import UserError

        raise UserError(f"value_model: rm needs a reward model with a one-output 'score' head; "
                        f"{type(reward_model).__name__} has none (use value_model: policy)")
    head = ValueHead(score.in_features)
    with torch.no_grad():
        head.summary.weight.copy_(score.weight.float())
        if score.bias is not None:
            head.summary.bias.copy_(score.bias.float())
    return reward_model.base_model, head
