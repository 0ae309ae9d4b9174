"""The RM stage: trl's RewardTrainer on the ranked reply groups, with one of two losses.

- ``rm_loss: pairwise``: every (better, worse) pair is an example (trl's Bradley-Terry loss);
- ``rm_loss: kwise``: every group is an example, its replies scored once (Open-Assistant's RMLoss,
  :mod:`oatui.train.rm_kwise`).

Groups are split into train and held out (a group's pairs never straddle the split);
``rm/accuracy`` is the share of held-out pairs the model orders correctly, and with ``kwise``
``rm/top1_accuracy`` the share of held-out groups whose best reply scores highest.
"""

from __future__ import annotations

from oatui.config import RMConfig
from oatui.data.datasets import rm_mix, tokenize_rm, tokenize_rm_groups
from oatui.models.loading import freeze_layers, load_reward_model, load_tokenizer, lora_config, uses_lora
from oatui.train.common import StageContext, stage_main


def train_rm(context: StageContext) -> None:
    from trl import RewardConfig, RewardTrainer

    from oatui.train.hf import train_and_save, trainer_arguments
    from oatui.train.rm_kwise import group_pairs, kwise_trainer_class

    config = context.config
    assert isinstance(config, RMConfig)
    model_name = context.model_name()
    tokenizer = load_tokenizer(model_name, config.trust_remote_code)
    mix = rm_mix(config.datasets, context.workspace.root, config.seed, config.val_fraction, config.skip_invalid)
    context.log("data: " + mix.describe("groups"))
    per_source = {}
    for source in mix.sources:
        context.log(f"{source.path}: {source.used} groups, {source.units} pairs in training")
        per_source[f"data/groups/{source.path}"] = source.used
        per_source[f"data/pairs/{source.path}"] = source.units

    if config.rm_loss == "kwise":
        train_rows = tokenize_rm_groups(mix.train, tokenizer, config.max_length, config.max_replies)
        eval_rows = tokenize_rm_groups(mix.eval, tokenizer, config.max_length, config.max_replies)

        def pairs(rows: list[dict]) -> int:
            return len(group_pairs([row["reply_ranks"] for row in rows])[0])

        counts = {"data/train_groups": len(train_rows), "data/eval_groups": len(eval_rows),
                  "data/train_pairs": pairs(train_rows), "data/eval_pairs": pairs(eval_rows),
                  "data/train_replies": sum(len(row["reply_ids"]) for row in train_rows)}
        context.log(f"{len(train_rows)} train groups ({counts['data/train_pairs']} pairs) / {len(eval_rows)} held-out "
                    f"groups ({counts['data/eval_pairs']} pairs); K-wise loss, each reply scored once")
        trainer_class: type = kwise_trainer_class(config.score_l2_reg)
    else:
        train_rows = tokenize_rm(mix.train, tokenizer, config.max_length, config.max_pairs_per_group)
        eval_rows = tokenize_rm(mix.eval, tokenizer, config.max_length, config.max_pairs_per_group)
        counts = {"data/train_pairs": len(train_rows), "data/eval_pairs": len(eval_rows)}
        context.log(f"{len(train_rows)} train pairs / {len(eval_rows)} held-out pairs")
        trainer_class = RewardTrainer
    context.metrics.write(0, 0, {**counts, **per_source})

    model = load_reward_model(model_name, config, tokenizer)
    if freeze_layers(model, config):
        context.log(f"embeddings and the first {config.freeze_layer} layers frozen")
    peft_config = lora_config(model, config, "SEQ_CLS") if uses_lora(config) else None

    args = RewardConfig(
        **trainer_arguments(config, context),
        max_length=config.max_length,
        center_rewards_coefficient=config.center_rewards_coefficient,
        dataset_num_proc=None,
        disable_dropout=True,
    )
    train_and_save(context, trainer_class, args, model, tokenizer, train_rows, eval_rows, peft_config)


def main(argv: list[str] | None = None) -> None:
    stage_main("rm", train_rm, argv)


if __name__ == "__main__":
    main()
