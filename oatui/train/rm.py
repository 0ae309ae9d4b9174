"""The RM stage: trl's RewardTrainer on the (better, worse) pairs of the ranked reply groups.

Groups are split into train and held out (a group's pairs never straddle the split);
``rm/accuracy`` is the share of held-out pairs the model orders correctly.
"""

from __future__ import annotations

from oatui.config import RMConfig
from oatui.train.common import StageContext, StageStopped, save_final, stage_main


def train_rm(context: StageContext) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from oatui.data.datasets import rm_mix, tokenize_rm
    from oatui.models.loading import load_reward_model, load_tokenizer, lora_config, uses_lora
    from oatui.train.hf import AtomicCheckpoints, RunDirCallback, evaluate_at_end, run_trainer, trainer_arguments

    config = context.config
    assert isinstance(config, RMConfig)
    model_name = context.model_name()
    tokenizer = load_tokenizer(model_name, config.trust_remote_code)
    mix = rm_mix(config.datasets, context.workspace.root, config.seed, config.val_fraction, config.skip_invalid)
    context.log("data: " + mix.describe("groups"))
    train_rows = tokenize_rm(mix.train, tokenizer, config.max_length, config.max_pairs_per_group)
    eval_rows = tokenize_rm(mix.eval, tokenizer, config.max_length, config.max_pairs_per_group)
    for source in mix.sources:
        context.log(f"{source.path}: {source.used} groups, {source.units} pairs in training")
    context.log(f"{len(train_rows)} train pairs / {len(eval_rows)} held-out pairs")
    per_source = {}
    for source in mix.sources:
        per_source[f"data/groups/{source.path}"] = source.used
        per_source[f"data/pairs/{source.path}"] = source.units
    context.metrics.write(0, 0, {"data/train_pairs": len(train_rows), "data/eval_pairs": len(eval_rows), **per_source})

    model = load_reward_model(model_name, config, tokenizer)
    peft_config = lora_config(model, config, "SEQ_CLS") if uses_lora(config) else None

    class Trainer(AtomicCheckpoints, RewardTrainer):
        pass

    args = RewardConfig(
        **trainer_arguments(config, context),
        max_length=config.max_length,
        center_rewards_coefficient=config.center_rewards_coefficient,
        dataset_num_proc=None,
        disable_dropout=True,
    )
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
    if not run_trainer(trainer, callback, context):
        raise StageStopped()
    evaluate_at_end(trainer, bool(eval_rows))
    if trainer.is_world_process_zero():
        final_model = trainer.model
        if peft_config is not None:
            final_model = final_model.merge_and_unload()
        save_final(final_model, tokenizer, context.run.final)
        context.log(f"final model: {context.run.final}")
    trainer.accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> None:
    stage_main("rm", train_rm, argv)


if __name__ == "__main__":
    main()
