"""Stage configuration: YAML files of named sections, composed in order, validated by type.

``--configs defaults tiny`` takes the section ``defaults`` and then ``tiny`` (later keys win), then
``--set key=value`` overrides one key at a time. Sections come from every ``*.yaml`` file in the
shipped ``configs/`` folder, in ``WORKSPACE/configs/`` and in the folders of ``$OATUI_CONFIG_PATH``
(``:``-separated); a section name may be defined once per folder, and a later folder (the
workspace, then ``$OATUI_CONFIG_PATH``) replaces a shipped section of the same name.

Every mistake is a :class:`~oatui.errors.UserError` of one line naming the file, section or option.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from oatui.errors import UserError

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
STAGES = ("sft", "rm", "rl")


class DatasetSpec(BaseModel):
    """One export file in a stage's data mix (Open-Assistant's ``datasets`` list)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    path: str
    """An export file (.jsonl or .jsonl.gz, relative to the workspace), ``sample`` for the shipped
    sample, or ``feedback`` for the rankings made in the chat pane (``WORKSPACE/data/feedback.trees.jsonl``)."""
    fraction: float = 1.0
    """Share of the file's examples to use (0 < fraction ≤ 1), or above 1 to repeat them (upsampling)."""
    max_examples: int | None = None
    """Cap on the examples taken from this file after ``fraction``."""
    optional: bool = False
    """Skip the file quietly when it does not exist yet (useful for ``feedback``)."""
    lang: list[str] | None = None
    """Languages to keep, e.g. ``[en, de]`` or Open-Assistant's ``"en,de"``: a tree is used only when
    its prompt's ``lang`` is listed (its other messages stay whatever their language); None: every
    language. For export files only."""
    top_k: int | None = None
    """Open-Assistant's ``top_k``: under every prompter message keep only the assistant replies ranked
    better than top_k (rank < top_k; an unranked reply only when it is the one reply), with their
    subtrees. Shapes SFT conversations and the conversations RM groups start from (not the groups'
    replies); RL prompts ignore it, as in Open-Assistant. None: every reply."""

    @field_validator("fraction")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be above 0")
        return value

    @field_validator("lang", mode="before")
    @classmethod
    def _language_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # Open-Assistant writes lang: "en,de"
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list):
            if not value:
                raise ValueError("must list at least one language (leave lang out for every language)")
            if any(not isinstance(code, str) or not code.strip() for code in value):
                raise ValueError("expected language codes such as en, de")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value


def _at_least_one(value: int) -> int:
    if value < 1:
        raise ValueError("must be at least 1")
    return value


class StageConfig(BaseModel):
    """Keys every stage shares."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    model_name: str = "tiny"
    """Base checkpoint: a local Hugging Face folder, a hub id (needs the hub or its cache), or
    ``tiny`` for the built-in tiny Pythia-architecture model, created in the workspace on first use."""
    datasets: list[DatasetSpec] = [DatasetSpec(path="sample")]
    """Export files to train on, each a mapping of the ``datasets[].KEY`` keys below."""
    skip_invalid: bool = False
    """Skip malformed lines of the export files (counted in the log) instead of stopping."""
    seed: int = 42
    """Seed for data splits, shuffling, initialisation and sampling."""
    val_fraction: float = 0.05
    """Share of trees (SFT) or ranked groups (RM) held out for evaluation."""
    max_length: int = 512
    """Longest tokenized conversation, in tokens; longer ones are cut at the end."""
    learning_rate: float = 1e-5
    """Peak learning rate of the optimizer (after warm-up)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    warmup_ratio: float = 0.05
    """Share of the optimizer steps over which the learning rate warms up (0 ≤ warmup_ratio < 1)."""
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    ] = "cosine"
    """The learning-rate schedule (transformers' ``get_scheduler`` names)."""
    gradient_accumulation_steps: int = 1
    """Forward passes summed into one optimizer step (effective batch = this × batch size × processes)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global L2 norm."""
    logging_steps: int = 10
    """Write a line to ``metrics.jsonl`` and the log every this many steps."""
    save_steps: int = 500
    """Write a resumable checkpoint every this many steps (and when stopped)."""
    save_total_limit: int = 2
    """Checkpoints kept in the run's ``checkpoints/`` folder."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Training precision: ``auto`` is bf16 on GPUs that support it, else float32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """``adamw_8bit`` uses bitsandbytes' 8-bit AdamW (a single consumer GPU, or CPU)."""
    load_in_8bit: bool = False
    """Load the base weights quantized to 8 bits (bitsandbytes, needs CUDA; implies LoRA training)."""
    load_in_4bit: bool = False
    """Load the base weights quantized to 4 bits (bitsandbytes NF4, needs CUDA; implies LoRA training)."""
    peft_model: bool = False
    """Train LoRA adapters instead of the full model."""
    lora_r: int = 16
    """LoRA rank of each adapter."""
    lora_alpha: int = 32
    """LoRA scaling: the adapters' update is multiplied by lora_alpha / lora_r."""
    lora_dropout: float = 0.05
    """Dropout on the adapters' input."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt; default: the model family's attention and MLP projections."""
    deepspeed: str | None = None
    """DeepSpeed config: a JSON file, or a name from ``configs/deepspeed/`` (``zero2``, ``zero3``, ...)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint folder to run. Off unless you trust the checkpoint."""
    torch_threads: int | None = None
    """CPU threads for torch (default: torch's own choice)."""
    tiny_model: dict[str, int] | None = None
    """Overrides of the tiny model's shape (hidden_size, num_hidden_layers, ...), when ``model_name: tiny``."""

    @field_validator("val_fraction", "warmup_ratio")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError("must be in [0, 1)")
        return value

    @field_validator("max_length", "gradient_accumulation_steps", "logging_steps", "save_total_limit")
    @classmethod
    def _positive_count(cls, value: int) -> int:
        return _at_least_one(value)

    @field_validator("learning_rate")
    @classmethod
    def _positive_rate(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be above 0")
        return value


class TrainerStageConfig(StageConfig):
    """Keys of the stages trained by the Hugging Face Trainer (SFT and RM); the RL stage counts
    PPO steps instead (``total_steps``)."""

    num_train_epochs: float = 1.0
    """Passes over the training data (fractions allowed); ``max_steps`` wins when set."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run ``num_train_epochs``)."""
    per_device_train_batch_size: int = 4
    """Training examples per process and forward pass (SFT: conversations; RM: ranked groups)."""
    per_device_eval_batch_size: int = 8
    """Evaluation examples per process and forward pass."""
    eval_steps: int = 100
    """Evaluate every this many steps (and at the end)."""
    dataloader_num_workers: int = 0
    """Worker processes loading batches (0: in the training process)."""

    @field_validator("per_device_train_batch_size", "per_device_eval_batch_size", "eval_steps")
    @classmethod
    def _positive_trainer_count(cls, value: int) -> int:
        return _at_least_one(value)


class SFTConfig(TrainerStageConfig):
    """Supervised fine-tuning on the conversations of the export trees (loss on assistant tokens)."""

    system_prompt: str | None = None
    """A system message put before every conversation."""


class RMConfig(TrainerStageConfig):
    """Reward-model training on the (better, worse) pairs of the ranked reply groups."""

    center_rewards_coefficient: float | None = None
    """Pull the mean reward towards 0 (Eisenstein et al.); None turns it off."""
    max_pairs_per_group: int | None = None
    """Cap on the pairs taken from one group (a group of k replies has k(k-1)/2)."""


TRITON_HOST_FORMAT = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}/[A-Za-z0-9_.\-]+$")


class RLConfig(StageConfig):
    """PPO against the reward model, with a KL penalty to the SFT model."""

    sft_model: str = "latest"
    """The policy's starting point (and the reference model): ``latest`` (newest succeeded SFT run's
    ``final/``) or a folder."""
    rm_model: str = "latest"
    """The reward model: ``latest`` (newest succeeded RM run's ``final/``) or a folder. With
    ``triton_host_rm`` only its tokenizer is read (for the EOS of its chat format), when it exists."""
    triton_host_rm: str | None = None
    """Score on a Triton server instead of in-process: ``host:grpcport/model`` ($TRITON_HOST_RM wins)."""
    triton_host_ref: str | None = None
    """Reference log-probs from a Triton server: ``host:grpcport/model`` ($TRITON_HOST_REF wins)."""
    remote_retries: int = 5
    """Attempts for a failed call to a Triton server, with exponential backoff, before the stage stops."""
    remote_timeout: float = 60.0
    """Seconds one call to a Triton server may take."""
    prompts: list[DatasetSpec] | None = None
    """Prompt sources: export files (their prompter turns) or a JSONL of ``{"prompt": ...}``;
    default: the stage's ``datasets``."""
    value_model: Literal["policy", "rm"] = "policy"
    """``policy``: a value head on the policy's trunk (one network, the memory of one model);
    ``rm``: a separate value network, the RM's trunk with a head started from its score head
    (a second trunk to train; the RM must share the policy's tokenizer)."""
    total_steps: int = 100
    """PPO steps (one rollout batch and its optimisation each)."""
    rollout_batch_size: int = 16
    """Prompts per step (per process)."""
    mini_batch_size: int = 8
    """Sequences per forward/backward pass in training (and per chunk when scoring); an optimizer
    step every ``gradient_accumulation_steps`` minibatches."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    max_new_tokens: int = 64
    """Longest response; a response that reaches it without EOS is cut there."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (1: the policy's own distribution)."""
    top_k: int = 0
    """Sample from the k likeliest tokens only (0: all)."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probability reaches top_p (1: all)."""
    max_prompt_length: int = 256
    """Longest prompt, in tokens; longer ones keep their end."""
    cliprange: float = 0.2
    """PPO's ε: the probability ratio is clipped to [1 − ε, 1 + ε]."""
    cliprange_value: float = 0.2
    """Values may move at most this far from the rollout's values in the clipped value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (0: entropy is only measured)."""
    gamma: float = 1.0
    """Discount per token in GAE (1: none)."""
    lam: float = 0.95
    """GAE's λ."""
    init_kl_coef: float = 0.05
    """Starting KL coefficient β (the whole time, without ``adaptive_kl``)."""
    adaptive_kl: bool = True
    """Ziegler et al.'s adaptive KL controller; off: the coefficient stays ``init_kl_coef``."""
    kl_target: float = 6.0
    """The adaptive controller's target for ``ppo/kl`` (summed over a response, in nats)."""
    kl_horizon: int = 10000
    """The adaptive controller's horizon, in sequences: how slowly β moves."""
    kl_estimator: Literal["k1", "k2", "k3", "abs", "mse"] = "k1"
    """Per-token KL estimate in the reward (x = logπ − logπ_ref): k1 = x, k2/mse = x²/2,
    k3 = e^−x − 1 + x, abs = |x|."""
    kl_clamp: float | None = None
    """Clamp the per-token KL estimate to ±this."""
    score_clip: float | None = None
    """Clip the reward model's score to ±this."""
    whiten_rewards: bool = False
    """Scale the RM scores by their running standard deviation before adding them."""
    whiten_advantages: bool = True
    """Standardise the advantages over all response tokens of the step (all processes together)."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of a response that did not end with EOS."""
    ratio_threshold: float = 10.0
    """Skip a minibatch whose mean probability ratio exceeds this (an exploding update)."""
    samples_per_log: int = 4
    """Prompt/response/score triples written to ``samples.jsonl`` every ``logging_steps``."""

    @field_validator("triton_host_rm", "triton_host_ref")
    @classmethod
    def _triton_host(cls, value: str | None) -> str | None:
        if value is not None and not TRITON_HOST_FORMAT.match(value):
            raise ValueError(f"{value!r} is not host:grpcport/model (e.g. localhost:8001/rm)")
        return value

    @field_validator("total_steps", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                     "max_prompt_length", "kl_horizon")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("temperature", "kl_target", "ratio_threshold", "remote_timeout")
    @classmethod
    def _above_zero(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be above 0")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError("must be in (0, 1]")
        return value

    @field_validator("gamma", "lam")
    @classmethod
    def _unit_interval(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError("must be in [0, 1]")
        return value

    @field_validator("mini_batch_size")
    @classmethod
    def _batches_divide(cls, value: int, info: ValidationInfo) -> int:
        # Fields validate in order: rollout_batch_size and (from StageConfig) gradient_accumulation_steps come first.
        rollout = info.data.get("rollout_batch_size")
        accumulation = info.data.get("gradient_accumulation_steps") or 1
        if value >= 1 and rollout is not None:
            if rollout % value:
                raise ValueError(f"rollout_batch_size {rollout} is not a multiple of mini_batch_size {value}")
            if (rollout // value) % accumulation:
                raise ValueError(f"the {rollout // value} minibatches of a rollout batch do not divide into "
                                 f"gradient_accumulation_steps {accumulation}")
        return value


#: The Trainer's keys that people reach for in the RL stage, and what the RL stage calls them.
NOT_FOR_RL = {"max_steps": "total_steps", "num_train_epochs": "total_steps",
              "per_device_train_batch_size": "mini_batch_size", "per_device_eval_batch_size": "mini_batch_size"}

STAGE_SCHEMAS: dict[str, type[StageConfig]] = {"sft": SFTConfig, "rm": RMConfig, "rl": RLConfig}


# ---------------------------------------------------------------------------------------------
# Section files


@dataclass
class Section:
    name: str
    values: dict[str, Any]
    file: Path
    line: int


@dataclass
class SectionIndex:
    sections: dict[str, Section] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.sections)


def config_dirs(workspace: Path | None) -> list[Path]:
    dirs = [SHIPPED_CONFIGS]
    if workspace is not None:
        dirs.append(workspace / "configs")
    for entry in os.environ.get("OATUI_CONFIG_PATH", "").split(os.pathsep):
        if entry:
            dirs.append(Path(entry))
    return dirs


class _LineLoader(yaml.SafeLoader):
    """A safe loader that remembers the line each top-level key starts on."""


def _read_sections(path: Path) -> list[Section]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read: {error}") from None
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return []
    if not isinstance(data, dict) or node is None or not isinstance(node, yaml.MappingNode):
        raise UserError(f"{path}: expected named sections (a mapping of section name to keys)")
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}
    sections = []
    for name, values in data.items():
        line = lines.get(str(name), 1)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"{path}:{line}: section '{name}' must be a mapping of keys to values")
        sections.append(Section(str(name), values, path, line))
    return sections


def load_index(workspace: Path | None = None) -> SectionIndex:
    index = SectionIndex()
    for folder in config_dirs(workspace):
        if not folder.is_dir():
            continue
        seen_here: dict[str, Section] = {}
        for path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
            for section in _read_sections(path):
                if section.name in seen_here:
                    first = seen_here[section.name]
                    raise UserError(
                        f"{path}:{section.line}: section '{section.name}' is already defined in "
                        f"{first.file}:{first.line}"
                    )
                seen_here[section.name] = section
        index.sections.update(seen_here)
    return index


# ---------------------------------------------------------------------------------------------
# Composition and validation


def parse_set(option: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``3``, ``1e-4``, ``true``, ``[a, b]``, ``null``)."""
    if "=" not in option:
        raise UserError(f"--set {option}: expected key=value")
    key, raw = option.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set {option}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


@dataclass
class Composed:
    values: dict[str, Any]
    origin: dict[str, str]
    """Where each key's value came from, for error messages."""


def compose(
    names: list[str],
    overrides: list[str] | None = None,
    workspace: Path | None = None,
    index: SectionIndex | None = None,
) -> Composed:
    index = index or load_index(workspace)
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name in names:
        section = index.sections.get(name)
        if section is None:
            close = difflib.get_close_matches(name, index.names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"unknown config section '{name}'{hint}; available: {', '.join(index.names())}")
        for key, value in section.values.items():
            values[key] = value
            origin[key] = f"section '{name}' ({section.file}:{section.line})"
    for option in overrides or []:
        key, value = parse_set(option)
        values[key] = value
        origin[key] = f"--set {option}"
    return Composed(values, origin)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        text = " or ".join(names)
        return f"{text} or null" if type(None) in args else text
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"a mapping with keys {', '.join(annotation.model_fields)}"
    return getattr(annotation, "__name__", str(annotation))


def validate(stage: str, composed: Composed) -> StageConfig:
    schema = STAGE_SCHEMAS[stage]
    known = list(schema.model_fields)
    for key in composed.values:
        if key not in schema.model_fields:
            close = [NOT_FOR_RL[key]] if stage == "rl" and key in NOT_FOR_RL else \
                difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown key '{key}' for the {stage} stage, from {composed.origin[key]}{hint}")
    try:
        return schema.model_validate(composed.values)
    except ValidationError as error:
        first = error.errors()[0]
        location = first["loc"]
        key = str(location[0]) if location else "?"
        annotation = schema.model_fields[key].annotation if key in schema.model_fields else None
        path = ".".join(str(part) for part in location)
        got = first.get("input")
        got_text = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 60 else type(got).__name__
        if first["type"] == "extra_forbidden" and len(location) > 1:
            what = f"unknown key '{location[-1]}'"
        elif first["type"] in ("value_error", "assertion_error"):
            what = first["msg"].removeprefix("Value error, ")
        else:
            what = f"expected {_type_name(annotation)}" if annotation is not None else first["msg"]
        raise UserError(f"{path}: {what}, got {got_text}, from {composed.origin.get(key, '?')}") from None


def load_stage_config(
    stage: str,
    names: list[str],
    overrides: list[str] | None = None,
    workspace: Path | None = None,
) -> StageConfig:
    """Compose, then validate: the one call the launcher makes."""
    if stage not in STAGE_SCHEMAS:
        raise UserError(f"unknown stage '{stage}'; expected one of {', '.join(STAGES)}")
    return validate(stage, compose(names, overrides, workspace))


def to_yaml(config: StageConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def from_yaml_file(stage: str, path: Path) -> StageConfig:
    """Read a run's resolved ``config.yaml`` back (for ``--resume``)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{path}: cannot read the run's config: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys to values")
    origin = {key: str(path) for key in data}
    return validate(stage, Composed(data, origin))


def deepspeed_config_path(name: str | None) -> str | None:
    """A DeepSpeed JSON config: a file, or a name from the shipped ``configs/deepspeed/``."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_file():
        return str(path.absolute())
    candidate = SHIPPED_CONFIGS / "deepspeed" / f"{name}.json"
    if candidate.is_file():
        return str(candidate)
    known = ", ".join(sorted(p.stem for p in (SHIPPED_CONFIGS / "deepspeed").glob("*.json")))
    raise UserError(f"deepspeed: {name!r} is neither a JSON file nor one of {known}")


def describe_schema(stage: str) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` rows for ``oatui train STAGE --list-keys``."""
    schema = STAGE_SCHEMAS[stage]
    rows = []
    for name, info in schema.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if isinstance(default, list) and default and isinstance(default[0], BaseModel):
            default = [d.model_dump(exclude_defaults=True) for d in default]
        rows.append((name, _type_name(info.annotation), repr(default), (info.description or "").replace("\n", " ")))
        if name == "datasets":  # the keys of one entry, as `datasets[].KEY`
            for entry_key, entry_info in DatasetSpec.model_fields.items():
                entry_default = "required" if entry_info.is_required() else repr(entry_info.get_default())
                rows.append((f"datasets[].{entry_key}", _type_name(entry_info.annotation), entry_default,
                             (entry_info.description or "").replace("\n", " ")))
    return rows
