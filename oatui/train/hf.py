"""Glue between the Hugging Face / trl trainers and the run directory.

- :class:`RunDirCallback` writes ``metrics.jsonl`` with oatui's metric names and turns a stop
  request into "save a checkpoint, then stop" at the next step boundary;
- :class:`AtomicCheckpoints` makes the trainer write each checkpoint under
  ``checkpoints/.partial/`` and rename it into place only when every rank has finished writing;
- :func:`trainer_arguments` maps the stage config onto trl's config class.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from oatui.config import TrainerStageConfig, deepspeed_config_path
from oatui.models.loading import pick_dtype
from oatui.train.common import (
    StageContext,
    StageStopped,
    is_main_process,
    publish_checkpoint,
    rename_trainer_logs,
    save_final,
    stop_requested_everywhere,
    world_size,
)


def evaluated_at(log_history: list[dict[str, Any]], step: int) -> bool:
    """Whether the trainer's log holds an evaluation of ``step`` (``eval_*`` metrics at that step)."""
    return any(entry.get("step") == step and any(key.startswith("eval_") for key in entry) for entry in log_history)


class RunDirCallback(TrainerCallback):
    def __init__(self, context: StageContext) -> None:
        self.context = context
        self.stopped = False
        self._last_tokens: tuple[float, float] | None = None  # (time, tokens) at the previous log

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.context.log(f"training for {state.max_steps} steps on {args.world_size} process(es)")

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if stop_requested_everywhere():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if not logs or not is_main_process():
            return
        metrics = rename_trainer_logs(logs)
        tokens = logs.get("num_tokens") or state.num_input_tokens_seen or None
        now = time.time()
        if tokens and "train/loss" in metrics:
            if self._last_tokens is not None and now > self._last_tokens[0] and tokens >= self._last_tokens[1]:
                metrics["perf/tokens_per_s"] = round((tokens - self._last_tokens[1]) / (now - self._last_tokens[0]), 1)
            self._last_tokens = (now, float(tokens))
        metrics.pop("train/num_tokens", None)
        metrics.pop("eval/num_tokens", None)
        if tokens:
            metrics["train/tokens_seen"] = int(tokens)
        self.context.metrics.write(state.global_step, state.max_steps, metrics)


class AtomicCheckpoints:
    """Mixin for a ``transformers.Trainer`` subclass: checkpoints appear complete or not at all."""

    def _get_output_dir(self, trial: Any) -> str:  # type: ignore[override]
        if getattr(self, "_oatui_saving", False):
            return os.path.join(self.args.output_dir, ".partial")
        return super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:  # type: ignore[override]
        self._oatui_saving = True
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._oatui_saving = False
        # Every rank (deepspeed writes per-rank shards) must be done before the rename.
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]
        if is_main_process():
            checkpoints = Path(self.args.output_dir)
            partial = checkpoints / ".partial" / f"checkpoint-{self.state.global_step}"  # type: ignore[attr-defined]
            if partial.exists():
                publish_checkpoint(partial, checkpoints, self.args.save_total_limit or 2)
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]


def trainer_arguments(config: TrainerStageConfig, context: StageContext) -> dict[str, Any]:
    """Keyword arguments shared by trl's SFTConfig and RewardConfig."""
    import torch

    dtype = pick_dtype(config.dtype)
    on_gpu = torch.cuda.is_available()
    has_eval = config.val_fraction > 0
    return dict(
        output_dir=str(context.run.checkpoints),
        seed=config.seed,
        data_seed=config.seed,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler_type,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        activation_checkpointing=config.gradient_checkpointing,
        optim="adamw_bnb_8bit" if config.optimizer == "adamw_8bit" else "adamw_torch",
        deepspeed=deepspeed_config_path(config.deepspeed),
        dataloader_num_workers=config.dataloader_num_workers,
        report_to=list(config.report_to) or "none",  # prepare_reporting points them at the run
        run_name=context.run.id,
        disable_tqdm=True,
        use_cpu=not on_gpu,
        ddp_backend="gloo" if not on_gpu and world_size() > 1 else None,
        remove_unused_columns=True,
        save_only_model=False,
        include_num_input_tokens_seen="all",
    )


def train_and_save(
    context: StageContext,
    trainer_class: type,
    args: Any,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    peft_config: Any = None,
) -> None:
    """Train with a trl trainer (atomic checkpoints, oatui metrics, stop requests), then write ``final/``.

    Resumes from the run's newest complete checkpoint; raises :class:`StageStopped` after a stop.
    """
    from datasets import Dataset

    class Trainer(AtomicCheckpoints, trainer_class):  # type: ignore[misc, valid-type]
        pass

    callback = RunDirCallback(context)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )
    resume = str(context.resume_from) if context.resume_from else None
    trainer.train(resume_from_checkpoint=resume)
    if callback.stopped:
        raise StageStopped()
    # One last evaluation, unless the trainer has just evaluated the last step (transformers does
    # at the end of training whenever it evaluates every eval_steps): the log says it once.
    if eval_rows and not evaluated_at(trainer.state.log_history, trainer.state.global_step):
        trainer.evaluate()
    if trainer.is_world_process_zero():
        final_model = trainer.model
        if peft_config is not None:
            final_model = final_model.merge_and_unload()
        save_final(final_model, tokenizer, context.run.final)
        context.log(f"final model: {context.run.final}")
    trainer.accelerator.wait_for_everyone()
