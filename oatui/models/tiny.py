"""The tiny default model: a Pythia-architecture (GPTNeoX) network small enough to train on a laptop CPU.

It is built from a config (no hub needed) with a byte-level BPE tokenizer trained on the shipped
sample export, the Open-Assistant special tokens included, and saved as an ordinary Hugging Face
folder in ``WORKSPACE/models/`` on first use. Later stages load it like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from oatui.data.format import ASSISTANT, DEFAULT_EOS, PAD, PROMPTER, SYSTEM
from oatui.data.rules import iter_usable
from oatui.data.sample import SAMPLE_FILE
from oatui.data.trees import iter_trees
from oatui.errors import UserError
from oatui.fsutil import locked, make_private_dir

TINY_SHAPE: dict[str, int] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 512,
    "vocab_size": 2048,
}
#: Shape keys a config may add to the tiny model's: ``padded_vocab_size`` gives the embedding at least
#: that many rows (Pythia pads its 50277 tokens to 50304), so that a model shaped like a real one has
#: its parameter count and logits size although the tokenizer trained on the sample is much smaller.
OPTIONAL_SHAPE_KEYS = ("padded_vocab_size",)
TOKENIZER_SPECIALS = [DEFAULT_EOS, PAD, PROMPTER, ASSISTANT, SYSTEM]
SEED = 1234


def _folder_name(shape: dict[str, int]) -> str:
    if shape == TINY_SHAPE:
        return "tiny-pythia"
    digest = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:8]
    return f"tiny-pythia-{digest}"


def train_tokenizer(vocab_size: int):  # -> PreTrainedTokenizerFast
    """A byte-level BPE (GPT-2/Pythia style) trained on every message of the sample export."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [message.text for tree in iter_trees(SAMPLE_FILE) for message in iter_usable(tree)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=TOKENIZER_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=DEFAULT_EOS,
        eos_token=DEFAULT_EOS,
        pad_token=PAD,
        model_max_length=TINY_SHAPE["max_position_embeddings"],
        padding_side="right",
    )
    fast.add_special_tokens({"additional_special_tokens": [PROMPTER, ASSISTANT, SYSTEM]})
    return fast


def build_tiny_model(folder: Path, shape: dict[str, int]) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = train_tokenizer(shape["vocab_size"])
    # Round the embedding up to a multiple of 64, as Pythia does, for friendlier matmul shapes.
    vocab = (max(len(tokenizer), shape.get("padded_vocab_size", 0)) + 63) // 64 * 64
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        intermediate_size=shape["intermediate_size"],
        max_position_embeddings=shape["max_position_embeddings"],
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(SEED)
    model = GPTNeoXForCausalLM(config)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    make_private_dir(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    staging.rename(folder)  # complete or absent, never half-written
    return folder


def ensure_tiny_model(models_dir: Path, overrides: dict[str, int] | None = None) -> Path:
    """The tiny model's folder, created on first use (safe when several processes ask at once)."""
    shape = dict(TINY_SHAPE)
    unknown = set(overrides or {}) - set(shape) - set(OPTIONAL_SHAPE_KEYS)
    if unknown:
        raise UserError(f"tiny_model: unknown keys {sorted(unknown)}; known: {sorted(shape) + list(OPTIONAL_SHAPE_KEYS)}")
    shape.update(overrides or {})
    make_private_dir(models_dir)
    folder = models_dir / _folder_name(shape)
    if (folder / "config.json").exists():
        return folder
    with locked(folder):
        if not (folder / "config.json").exists():
            build_tiny_model(folder, shape)
    return folder
