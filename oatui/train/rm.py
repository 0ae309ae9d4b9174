"""The RM stage: trl's RewardTrainer on the (better, worse) pairs of the ranked reply groups.

Groups are split into train and held out (a group's pairs never straddle the split);
``rm/accuracy`` is the share of held-out pairs the model orders correctly.
"""

from __future__ import annotations

from oatui.config import RMConfig
from oatui.train.common import StageContext, stage_main


def train_rm(context: StageContext) -> None:
    from trl import RewardConfig, RewardTrainer

    from oatui.data.datasets import rm_mix, tokenize_rm
    from oatui.models.loading import load_reward_model, load_tokenizer, lora_config, uses_lora
    from oatui.train.hf import train_and_save, trainer_arguments

    config = context.config
    assert isinstance(config, RMConfig)
    model_name = context.model_name()
    tokenizer = load_tokenizer(model_name, config.trust_remote_code)
    mix = rm_mix(config.datasets, context.workspace.root, config.seed, config.val_fraction, config.skip_invalid)
    context.log("data: " + mix.describe("groups"))
    train_rows = tokenize_rm(mix.train, tokenizer, config.max_length, config.max_pairs_per_group)
    eval_rows = tokenize_rm(mix.eval, tokenizer, config.max_length, config.max_pairs_per_group)
    per_source = {}
    for source in mix.sources:
        context.log(f"{source.path}: {source.used} groups, {source.units} pairs in training")
        per_source[f"data/groups/{source.path}"] = source.used
        per_source[f"data/pairs/{source.path}"] = source.units
    context.log(f"{len(train_rows)} train pairs / {len(eval_rows)} held-out pairs")
    context.metrics.write(0, 0, {"data/train_pairs": len(train_rows), "data/eval_pairs": len(eval_rows), **per_source})

    model = load_reward_model(model_name, config, tokenizer)
    peft_config = lora_config(model, config, "SEQ_CLS") if uses_lora(config) else None

    args = RewardConfig(
        **trainer_arguments(config, context),
        max_length=config.max_length,
        center_rewards_coefficient=config.center_rewards_coefficient,
        dataset_num_proc=None,
        disable_dropout=True,
    )
    train_and_save(context, RewardTrainer, args, model, tokenizer, train_rows, eval_rows, peft_config)


def main(argv: list[str] | None = None) -> None:
    stage_main("rm", train_rm, argv)


if __name__ == "__main__":
    main()
