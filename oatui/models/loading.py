"""Loading checkpoints for training and inference: a local folder, a hub id, or the tiny default.

The Open-Assistant special tokens (``<|prompter|>``, ``<|assistant|>``, ``<|system|>``) and a pad
token are added when a tokenizer lacks them, and the embeddings are resized to match. Quantized
loading, LoRA and gradient checkpointing are switched on from the stage config. No checkpoint code
runs (``trust_remote_code``) unless the config says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oatui.data.format import ASSISTANT, PAD, PROMPTER, SYSTEM
from oatui.errors import UserError
from oatui.fsutil import UnreadableFile, expand_user, read_json_file
from oatui.models.tiny import ensure_tiny_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from oatui.config import StageConfig

LORA_TARGETS = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


#: ``model_name: latest-sft``: start from the newest succeeded SFT run's ``final/`` (as InstructGPT
#: starts its reward model from the SFT model).
LATEST_SFT = "latest-sft"


def resolve_model_name(name: str, models_dir: Path, tiny_overrides: dict[str, int] | None = None) -> str:
    """A loadable name: ``tiny`` becomes the workspace's tiny model folder; paths must exist."""
    if name == "tiny":
        return str(ensure_tiny_model(models_dir, tiny_overrides))
    path = expand_user(name)
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model folder {path} has no config.json (expected a Hugging Face checkpoint folder)")
        return str(path.absolute())
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise UserError(f"model {name!r}: no such folder (and not a hub id of the form org/name)")
    return name  # a hub id: from_pretrained finds it in the cache or on the hub


def check_model_name(name: str) -> None:
    """Cheap check before a run starts: a path that does not exist is bad input, said at once."""
    if name in ("tiny", "latest", LATEST_SFT):
        return
    path = expand_user(name)
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model folder {path} has no config.json (expected a Hugging Face checkpoint folder)")
        return
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise UserError(f"model {name!r}: no such folder (and not a hub id of the form org/name)")


#: The JSON files of a checkpoint folder that transformers reads; each must be a JSON object.
CHECKPOINT_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json",
                         "special_tokens_map.json", "tokenizer.json", "added_tokens.json")


def check_checkpoint_files(name: str) -> None:
    """A local checkpoint folder's JSON files are JSON objects (read with the same bounds and one
    error line as every file oatui reads back); transformers would fail on them with a traceback."""
    folder = Path(name)
    if not folder.is_dir():
        return
    for file_name in CHECKPOINT_JSON_FILES:
        path = folder / file_name
        if path.exists():
            try:
                read_json_file(path, dict, max_bytes=1 << 30)
            except UnreadableFile as error:
                raise UserError(f"model {error}") from None


def load_tokenizer(name: str, trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    check_checkpoint_files(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception for a file of the wrong schema
        first = (str(error).splitlines() or [type(error).__name__])[0][:300]
        raise UserError(f"cannot load the tokenizer of {name}: {first}") from None
    missing = [token for token in (PROMPTER, ASSISTANT, SYSTEM) if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        if PAD in tokenizer.get_vocab():
            tokenizer.pad_token = PAD
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
    if tokenizer.eos_token is None:
        raise UserError(f"the tokenizer of {name} has no EOS token")
    tokenizer.padding_side = "right"
    return tokenizer


def pick_dtype(setting: str) -> "torch.dtype":
    import torch

    if setting == "float32":
        return torch.float32
    if setting == "bfloat16":
        return torch.bfloat16
    if setting == "float16":
        return torch.float16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _quantization(config: "StageConfig") -> Any:
    if not (config.load_in_8bit or config.load_in_4bit):
        return None
    import torch

    if not torch.cuda.is_available():
        raise UserError("load_in_8bit / load_in_4bit need a CUDA GPU (bitsandbytes quantized weights)")
    from transformers import BitsAndBytesConfig

    if config.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=pick_dtype(config.dtype),
            bnb_4bit_use_double_quant=True,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _load(auto_class: Any, name: str, config: "StageConfig", tokenizer: "PreTrainedTokenizerBase", **kwargs: Any):
    quantization = _quantization(config)
    extra: dict[str, Any] = dict(kwargs)
    if quantization is not None:
        extra["quantization_config"] = quantization
        extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = auto_class.from_pretrained(
            name,
            dtype=pick_dtype(config.dtype),
            trust_remote_code=config.trust_remote_code,
            **extra,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"cannot load model {name}: {(str(error).splitlines() or [type(error).__name__])[0][:300]}") from None
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return model


def lora_config(model: "PreTrainedModel", config: "StageConfig", task_type: str):
    from peft import LoraConfig

    targets = config.lora_target_modules or LORA_TARGETS.get(model.config.model_type)
    if not targets:
        raise UserError(
            f"lora_target_modules: no default for model type {model.config.model_type!r}; list the module names"
        )
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )


def uses_lora(config: "StageConfig") -> bool:
    return config.peft_model or config.load_in_8bit or config.load_in_4bit


def freeze_layers(model: "PreTrainedModel", config: "StageConfig") -> int:
    """Freeze the input embeddings and the first ``config.freeze_layer`` transformer layers (Open-Assistant's
    ``freeze_layer``); the number of parameter tensors frozen."""
    import torch

    count = config.freeze_layer
    if not count:
        return 0
    if uses_lora(config):
        raise UserError("freeze_layer: LoRA already trains adapters only; set freeze_layer: 0 or peft_model: false")
    depth = getattr(model.config, "num_hidden_layers", None)
    # The transformer's blocks: the model's first list of modules as long as its config's layer count.
    layers = next((module for module in model.modules()
                   if isinstance(module, torch.nn.ModuleList) and depth and len(module) == depth), None)
    if layers is None:
        raise UserError(f"freeze_layer: cannot find the transformer layers of model type {model.config.model_type!r}")
    if count > len(layers):
        raise UserError(f"freeze_layer: {count} is more than the model's {len(layers)} layers")
    frozen = [*model.get_input_embeddings().parameters(),
              *(parameter for layer in list(layers)[:count] for parameter in layer.parameters())]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return len(frozen)


def load_causal_lm(name: str, config: "StageConfig", tokenizer: "PreTrainedTokenizerBase") -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, name, config, tokenizer)


def load_reward_model(name: str, config: "StageConfig", tokenizer: "PreTrainedTokenizerBase") -> "PreTrainedModel":
    """A sequence classifier with one output: the scalar reward of a whole conversation."""
    from transformers import AutoModelForSequenceClassification

    return _load(AutoModelForSequenceClassification, name, config, tokenizer, num_labels=1)


def load_for_inference(name: str, kind: str, device: str = "cpu", dtype: str = "float32"):
    """Model and tokenizer for scoring or generation outside training (export, RL, tests)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = load_tokenizer(name)
    auto = AutoModelForSequenceClassification if kind == "rm" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(name, dtype=pick_dtype(dtype))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"cannot load model {name}: {str(error).splitlines()[0]}") from None
    model.to(torch.device(device)).eval()
    return model, tokenizer
