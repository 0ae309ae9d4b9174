"""``freeze_layer`` (Open-Assistant's): the input embeddings and the first N transformer layers stop
training, everything above keeps learning; a bad value is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from oatui.config import load_stage_config
from oatui.errors import UserError
from oatui.models.loading import freeze_layers

from helpers import run_oatui


def tiny_neox() -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=32,
                                            tie_word_embeddings=False))


def test_the_embeddings_and_lower_layers_are_frozen_and_the_rest_learns() -> None:
    model = tiny_neox()
    config = load_stage_config("rl", ["defaults_rl", "tiny_rl"], ["freeze_layer=2"])
    frozen = freeze_layers(model, config)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert frozen == len(list(model.gpt_neox.embed_in.parameters())) + sum(
        len(list(layer.parameters())) for layer in model.gpt_neox.layers[:2])
    assert not any(name.startswith(("gpt_neox.embed_in.", "gpt_neox.layers.0.", "gpt_neox.layers.1.")) for name in trainable)
    assert {"gpt_neox.layers.2.attention.query_key_value.weight", "gpt_neox.layers.3.mlp.dense_4h_to_h.weight",
            "gpt_neox.final_layer_norm.weight", "lm_head.weight"} <= trainable

    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]) == (name not in trainable), name


def test_nothing_is_frozen_by_default() -> None:
    model = tiny_neox()
    assert freeze_layers(model, load_stage_config("sft", ["defaults"])) == 0
    assert all(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize(("overrides", "message"), [
    (["freeze_layer=5"], "freeze_layer: 5 is more than the model's 4 layers"),
    (["freeze_layer=1", "peft_model=true"], "freeze_layer: LoRA already trains adapters only"),
])
def test_a_freeze_that_cannot_apply_is_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        freeze_layers(tiny_neox(), load_stage_config("sft", ["defaults"], overrides))


def test_a_negative_freeze_layer_is_refused() -> None:
    with pytest.raises(UserError, match="freeze_layer: must be at least 0, got -1"):
        load_stage_config("rm", ["defaults_rm"], ["freeze_layer=-1"])


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "sections", "start"), [
    ("sft", ["defaults", "tiny"], "tiny_base"),
    ("rm", ["defaults_rm", "tiny_rm"], "sft_model"),
])
def test_sft_and_rm_runs_keep_frozen_layers_as_they_started(trained, workspace: Path, stage: str,  # noqa: ANN001
                                                            sections: list[str], start: str) -> None:
    """A real ``oatui train sft|rm`` with ``freeze_layer=2``: the embeddings and the two lower layers
    of its final model are bit-identical to the model it started from; the upper layers trained."""
    base = getattr(trained, start)
    result = run_oatui("train", stage, "--configs", *sections, "--set", f"model_name={base}", "--set", "freeze_layer=2",
                       "--set", "max_steps=4", "--set", "eval_steps=100", workspace=workspace, check=True)
    assert "embeddings and the first 2 layers frozen" in result.stdout
    final = next((workspace / "runs").glob(f"{stage}-*")) / "final"
    before, after = load_file(base / "model.safetensors"), load_file(final / "model.safetensors")
    frozen = [name for name in before if name.startswith(("gpt_neox.embed_in.", "gpt_neox.layers.0.", "gpt_neox.layers.1."))]
    upper = [name for name in before if name.startswith("gpt_neox.layers.3.") and name.endswith(".weight")]
    assert len(frozen) == 1 + 2 * 12 and upper
    assert all(torch.equal(before[name], after[name]) for name in frozen)
    assert all(not torch.equal(before[name], after[name]) for name in upper)
