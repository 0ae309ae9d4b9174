"""The KL coefficient: fixed, or adapted towards a target KL (Ziegler et al. 2019, section 2.2).

The adaptive rule: e = clip(KL / target − 1, −0.2, 0.2); β ← β·(1 + e·n / horizon), where KL is
the mean over the batch's sequences of their summed KL and n the number of sequences that
measured it (all ranks together: the trainer passes global values, so every rank keeps the same β).
"""

from __future__ import annotations

from typing import Any


class FixedKLController:
    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_sequences: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(init_kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs kl_target > 0 and kl_horizon > 0")
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_sequences: int) -> float:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_sequences / self.horizon
        return self.value


def make_kl_controller(adaptive: bool, init_kl_coef: float, target: float, horizon: int) -> FixedKLController:
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)
