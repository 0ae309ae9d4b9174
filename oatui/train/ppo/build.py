"""Setting the RL stage up: which models, where they run, the accelerator and the optimizer."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from oatui.config import RLConfig, deepspeed_config_path
from oatui.errors import UserError
from oatui.models.loading import (
    freeze_layers,
    load_causal_lm,
    load_for_inference,
    load_reward_model,
    load_tokenizer,
    lora_config,
    pick_dtype,
    uses_lora,
)
from oatui.stages.rundir import RunDir
from oatui.stages.runs import require_latest_final
from oatui.train.common import WANDB_PROJECT, world_size
from oatui.train.ppo.models import ActorCritic, ValueHead, disable_dropout, value_model_from_rm
from oatui.train.ppo.scoring import LocalReference, LocalRewardModel, RemoteReference, RemoteRewardModel

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from oatui.train.common import StageContext
    from oatui.train.ppo.scoring import Reference, RewardModel

def resolve_stage_model(value: str, stage: str, context: "StageContext") -> str:
    """``latest`` → the newest succeeded ``stage`` run's ``final/``; anything else → a loadable name."""
    if value == "latest":
        return str(require_latest_final(context.workspace.root, stage))
    return context.model_name(value)


def make_accelerator(config: RLConfig, hidden_size: int, run: RunDir | None = None) -> "Accelerator":
    """An ``Accelerator``; with ``deepspeed`` set, through accelerate's DeepSpeed plugin; with
    ``report_to``, logging to its trackers (:func:`start_trackers` starts them).

    There is no dataloader for accelerate to read batch sizes from, so the DeepSpeed config's
    ``auto`` values are filled here.
    """
    from accelerate import Accelerator

    options: dict[str, Any] = dict(gradient_accumulation_steps=config.gradient_accumulation_steps)
    if config.report_to and run is not None:
        options["log_with"] = report_trackers(config, run)
    if not config.deepspeed and not torch.cuda.is_available():
        # Several processes on a machine without GPUs: torch.distributed with gloo (accelerate's MULTI_CPU).
        options["cpu"] = True
    if config.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        path = deepspeed_config_path(config.deepspeed)
        ds = json.loads(Path(path).read_text(encoding="utf-8"))  # type: ignore[arg-type]
        dtype = pick_dtype(config.dtype)
        filled = {
            "train_micro_batch_size_per_gpu": config.mini_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "train_batch_size": config.mini_batch_size * config.gradient_accumulation_steps * world_size(),
            "gradient_clipping": config.max_grad_norm,
        }
        for key, value in filled.items():
            if ds.get(key, "auto") == "auto":
                ds[key] = value
        for key, enabled in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
            if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
                ds[key]["enabled"] = enabled
        zero = ds.get("zero_optimization", {})
        sizes = {"reduce_bucket_size": hidden_size * hidden_size,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "stage3_param_persistence_threshold": 10 * hidden_size}
        for key, value in sizes.items():
            if zero.get(key) == "auto":
                zero[key] = value
        options["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
        options["mixed_precision"] = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    return Accelerator(**options)


def report_trackers(config: RLConfig, run: RunDir) -> list[Any]:
    """``report_to`` as accelerate's ``log_with``. TensorBoard's tracker is made here so that its
    events land in ``RUN/tensorboard/`` itself, as SFT's and RM's do (by name, accelerate would put
    them in a folder named after the project, which is wandb's project too)."""
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker(run.tensorboard.name, run.path) if name == "tensorboard" else name
            for name in config.report_to]


def start_trackers(accelerator: "Accelerator", config: RLConfig, run: RunDir) -> None:
    """Start the ``report_to`` trackers (on the main process; a no-op without ``report_to``):
    wandb's run is named by the run id, in ``$WANDB_PROJECT`` or ``oatui``, with the config."""
    if config.report_to:
        accelerator.init_trackers(os.environ.get("WANDB_PROJECT", WANDB_PROJECT), init_kwargs={
            "wandb": {"name": run.id, "dir": str(run.path), "config": config.model_dump(mode="json")}})


def zero_stage(accelerator: "Accelerator") -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def build_actor_critic(config: RLConfig, sft_path: str, rm_path: str | None,
                       tokenizer: "PreTrainedTokenizerBase") -> ActorCritic:
    """The policy from the SFT model (LoRA-wrapped when asked) and the value estimates ``value_model`` names."""
    policy = load_causal_lm(sft_path, config, tokenizer)
    freeze_layers(policy, config)
    if uses_lora(config):
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(policy, config, "CAUSAL_LM"))
    if config.value_model == "policy":
        model = ActorCritic(policy, ValueHead(policy.config.hidden_size))
    else:
        assert rm_path is not None
        rm_tokenizer = load_tokenizer(rm_path, config.trust_remote_code)
        if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"value_model: rm reads the policy's tokens, but the reward model {rm_path} has another "
                            "tokenizer; use value_model: policy")
        trunk, head = value_model_from_rm(load_reward_model(rm_path, config, rm_tokenizer))
        if uses_lora(config):
            from peft import get_peft_model

            trunk = get_peft_model(trunk, lora_config(trunk, config, "FEATURE_EXTRACTION"))
        model = ActorCritic(policy, head, trunk)
    disable_dropout(model)
    return model


def build_reference(config: RLConfig, model: ActorCritic, sft_path: str, address: str | None,
                    device: torch.device) -> "Reference":
    """A Triton server; else the LoRA policy with its adapter off; else a frozen copy of the SFT model."""
    if address:
        return RemoteReference(address, config.remote_retries, config.remote_timeout)
    if uses_lora(config):
        return LocalReference(model.policy, disable_adapter=True)
    reference, _ = load_for_inference(sft_path, "causal", device=str(device), dtype=config.dtype)
    reference.requires_grad_(False)
    return LocalReference(reference)


def build_reward_model(config: RLConfig, rm_path: str | None, address: str | None, device: torch.device,
                       fallback_eos: str) -> "RewardModel":
    if address:
        eos = load_tokenizer(rm_path, config.trust_remote_code).eos_token if rm_path else fallback_eos
        return RemoteRewardModel(address, eos, config.remote_retries, config.remote_timeout)
    assert rm_path is not None
    reward_model, rm_tokenizer = load_for_inference(rm_path, "rm", device=str(device), dtype=config.dtype)
    reward_model.requires_grad_(False)
    return LocalRewardModel(reward_model, rm_tokenizer, batch_size=config.mini_batch_size)


def optimizer_steps(config: RLConfig) -> int:
    minibatches = config.rollout_batch_size // config.mini_batch_size
    return config.total_steps * config.ppo_epochs * minibatches // config.gradient_accumulation_steps


def make_optimizer(model: torch.nn.Module, config: RLConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (or bitsandbytes' 8-bit AdamW) over the trainable parameters, and the learning-rate schedule."""
    from transformers import get_scheduler

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if config.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    total = optimizer_steps(config)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(config.warmup_ratio * total), num_training_steps=total)
    return optimizer, scheduler
