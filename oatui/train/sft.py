"""The SFT stage: trl's SFTTrainer on the conversations of the export trees, loss on assistant tokens.

Run by ``oatui train sft`` as ``python -m oatui.train.sft --run-dir DIR`` (or under accelerate /
deepspeed); it reads everything else from the run directory.
"""

from __future__ import annotations

from oatui.config import SFTConfig
from oatui.data.datasets import sft_mix, tokenize_sft
from oatui.models.loading import freeze_layers, load_causal_lm, load_tokenizer, lora_config, uses_lora
from oatui.train.common import StageContext, stage_main


def train_sft(context: StageContext) -> None:
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    from oatui.train.hf import train_and_save, trainer_arguments

    config = context.config
    assert isinstance(config, SFTConfig)
    model_name = context.model_name()
    tokenizer = load_tokenizer(model_name, config.trust_remote_code)
    mix = sft_mix(config.datasets, context.workspace.root, config.seed, config.val_fraction, config.skip_invalid)
    context.log("data: " + mix.describe("conversations"))
    train_rows = tokenize_sft(mix.train, tokenizer, config.max_length, config.system_prompt)
    eval_rows = tokenize_sft(mix.eval, tokenizer, config.max_length, config.system_prompt)
    trained_tokens = sum(sum(row["assistant_masks"]) for row in train_rows)
    context.log(f"{len(train_rows)} train / {len(eval_rows)} eval conversations, {trained_tokens} assistant tokens carry the loss")

    model = load_causal_lm(model_name, config, tokenizer)
    if freeze_layers(model, config):
        context.log(f"embeddings and the first {config.freeze_layer} layers frozen")
    peft_config = lora_config(model, config, "CAUSAL_LM") if uses_lora(config) else None

    args = TrlSFTConfig(
        **trainer_arguments(config, context),
        max_length=config.max_length,
        packing=False,
        completion_only_loss=False,
        dataset_num_proc=None,
    )
    train_and_save(context, SFTTrainer, args, model, tokenizer, train_rows, eval_rows, peft_config)


def main(argv: list[str] | None = None) -> None:
    stage_main("sft", train_sft, argv)


if __name__ == "__main__":
    main()
