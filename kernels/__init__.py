"""oatui_kernels: custom kernels for the PPO stage (the folder kernels/, imported as oatui_kernels).

The public face is :func:`fused_kl_reward_gae` and its result :class:`KLRewardGAE`; the pieces
it is made of are exported too so that trainers and tests can use them on their own. The Triton
kernel module (``oatui_kernels.triton_kernel``) is imported only when the Triton backend runs.
"""

from .estimators import KL_ESTIMATORS, canonical_estimator, kl_estimate
from .fused import fused_kl_reward_gae
from .reference import reference_kl_reward_gae
from .result import KLRewardGAE
from .torch_path import discounted_reverse_cumsum, gae, kl_penalized_rewards, masked_whiten

__all__ = [
    "KLRewardGAE",
    "KL_ESTIMATORS",
    "canonical_estimator",
    "discounted_reverse_cumsum",
    "fused_kl_reward_gae",
    "gae",
    "kl_estimate",
    "kl_penalized_rewards",
    "masked_whiten",
    "reference_kl_reward_gae",
]
