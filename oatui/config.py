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
import reprlib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

from oatui.errors import UserError
from oatui.fsutil import UnreadableFile, expand_user, read_json_file, read_text_file, untrusted_reason
from oatui.models.tiny import OPTIONAL_SHAPE_KEYS, TINY_SHAPE

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
STAGES = ("sft", "rm", "rl")


class DatasetSpec(BaseModel):
    """One export file in a stage's data mix (Open-Assistant's ``datasets`` list)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    path: str
    """An export file (.jsonl or .jsonl.gz, relative to the workspace), ``sample`` for the shipped
    sample, or ``feedback`` for the rankings made in the chat pane (``WORKSPACE/data/feedback.trees.jsonl``)."""
    fraction: float = Field(1.0, gt=0)
    """Share of the file's examples to use (0 < fraction ≤ 1), or above 1 to repeat them (upsampling)."""
    max_examples: int | None = None
    """Cap on the examples taken from this file after ``fraction``."""
    optional: bool = False
    """Skip the file quietly when it does not exist yet (useful for ``feedback``)."""
    lang: list[str] | None = None
    """Languages to keep, e.g. ``[en, de]`` or Open-Assistant's ``"en,de"``: a tree is used only when
    its prompt's ``lang`` is listed (its other messages stay whatever their language); None: every
    language. For export files only."""
    top_k: int | None = Field(None, ge=1)
    """Open-Assistant's ``top_k``: under every prompter message keep only the assistant replies ranked
    better than top_k (rank < top_k; an unranked reply only when it is the one reply), with their
    subtrees. Shapes SFT conversations and the conversations RM groups start from (not the groups'
    replies); RL prompts ignore it, as in Open-Assistant. None: every reply."""

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


def _restated(base: type[BaseModel], name: str, default: Any) -> Any:
    """``base``'s field ``name`` (its type, help and range) with a stage's own default.

    The schema is the one source of every default: a stage whose default differs restates the
    field with this, and the ``defaults*`` sections in ``configs/`` name no keys."""
    return FieldInfo.merge_field_infos(base.model_fields[name], default=default)


#: transformers' ``get_scheduler`` names.
SchedulerName = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
]


#: Where ``report_to`` can send the metrics (transformers' and accelerate's names for them).
Reporter = Literal["tensorboard", "wandb"]
REPORTERS: tuple[str, ...] = typing.get_args(Reporter)


MAX_TOKENS = 1 << 20
"""Bound on lengths in tokens (max_length, max_prompt_length, max_new_tokens): a typo such as
10**12 is refused with the config, not after a run folder exists."""
MAX_TINY_DIMENSION = 1 << 17
"""Bound on each dimension of the tiny model's shape."""


class StageConfig(BaseModel):
    """Keys every stage shares."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    model_name: str = "tiny"
    """Base checkpoint: a local Hugging Face folder, a hub id (needs the hub or its cache), ``tiny``
    for the built-in tiny Pythia-architecture model, created in the workspace on first use, or
    ``latest-sft`` for the newest succeeded SFT run's ``final/`` (a reward model started from the
    SFT model, as InstructGPT does)."""
    datasets: list[DatasetSpec] = [DatasetSpec(path="sample"), DatasetSpec(path="feedback", optional=True)]
    """Export files to train on, each with an optional fraction; see ``DatasetSpec``."""
    skip_invalid: bool = False
    """Skip malformed lines of the export files (counted in the log) instead of stopping."""
    seed: int = 42
    """Seed for data splits, shuffling, initialisation and sampling."""
    val_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of trees (SFT) or ranked groups (RM) held out for evaluation."""
    max_length: int = Field(512, ge=1, le=MAX_TOKENS)
    """Longest tokenized conversation, in tokens; longer ones are cut at the end."""
    learning_rate: float = Field(1e-5, gt=0)
    """Peak learning rate of the optimizer (after warm-up)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of the optimizer steps over which the learning rate warms up (0 ≤ warmup_ratio < 1)."""
    lr_scheduler_type: SchedulerName = "cosine"
    """The learning-rate schedule (transformers' ``get_scheduler`` names)."""
    gradient_accumulation_steps: int = Field(2, ge=1)
    """Forward passes summed into one optimizer step (effective batch = this × batch size × processes)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global L2 norm."""
    logging_steps: int = Field(10, ge=1)
    """Write a line to ``metrics.jsonl`` and the log every this many steps."""
    report_to: list[Reporter] = []
    """Also send the metrics to these trackers: ``tensorboard`` (event files in the run's
    ``tensorboard/`` folder, so ``tensorboard --logdir WORKSPACE/runs`` shows every run) and/or
    ``wandb`` (needs the wandb package; project ``$WANDB_PROJECT`` or ``oatui``, the run named by
    its id). A list, or one name or ``tensorboard,wandb`` as text; empty or ``none``: only
    ``metrics.jsonl``. SFT and RM log through transformers' integrations (its tag names:
    ``train/loss``, ``eval/loss``, ``eval/accuracy``, ...), RL through accelerate's trackers
    (``metrics.jsonl``'s names: ``ppo/score_mean``, ``ppo/kl``, ``eval/proxy``, ...)."""
    save_steps: int = 500
    """Write a resumable checkpoint every this many steps (and when stopped)."""
    save_total_limit: int = Field(2, ge=1)
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
    freeze_layer: int = Field(0, ge=0)
    """Open-Assistant's ``freeze_layer``: train with the input embeddings (and an output layer tied to
    them) and the first this many transformer layers frozen (0: train everything). In the RL stage
    it applies to the policy: what the lower layers learnt in SFT (such as copying the prompt's
    topic) stays intact while PPO shapes the answers. Not with LoRA, which trains adapters only."""
    deepspeed: str | None = None
    """DeepSpeed config: a JSON file, or a name from ``configs/deepspeed/`` (``zero2``, ``zero3``, ...)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint folder to run. Off unless you trust the checkpoint."""
    torch_threads: int | None = None
    """CPU threads for torch (default: torch's own choice)."""
    tiny_model: dict[str, int] | None = None
    """Overrides of the tiny model's shape (hidden_size, num_hidden_layers, ...), when ``model_name: tiny``."""

    @field_validator("tiny_model")
    @classmethod
    def _tiny_shape(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is None:
            return value

        known = [*TINY_SHAPE, *OPTIONAL_SHAPE_KEYS]
        for key, number in value.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown shape key '{key}'{hint}; known: {', '.join(known)}")
            if not 1 <= number <= MAX_TINY_DIMENSION:
                raise ValueError(f"{key} {number} must be between 1 and {MAX_TINY_DIMENSION}")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _reporter_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):  # report_to: tensorboard, or "tensorboard,wandb" as transformers writes it
            value = [part.strip() for part in value.split(",") if part.strip()]
            value = [] if value == ["none"] else value
        if isinstance(value, list):
            for name in value:
                if name not in REPORTERS:
                    raise ValueError(f"unknown reporter {name!r}; known: {', '.join(REPORTERS)}")
            return list(dict.fromkeys(value))
        return value

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_file(cls, value: str | None) -> str | None:
        if value:
            path = deepspeed_config_path(value)
            try:
                read_json_file(path)  # type: ignore[arg-type]
            except UnreadableFile as error:
                raise ValueError(f"not a DeepSpeed JSON config: {error}") from None
        return value



class TrainerStageConfig(StageConfig):
    """Keys of the stages trained by the Hugging Face Trainer (SFT and RM); the RL stage counts
    PPO steps instead (``total_steps``)."""

    num_train_epochs: float = 3.0
    """Passes over the training data (fractions allowed); ``max_steps`` wins when set."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run ``num_train_epochs``)."""
    per_device_train_batch_size: int = Field(4, ge=1)
    """Training examples per process and forward pass (SFT: conversations; RM: ranked groups)."""
    per_device_eval_batch_size: int = Field(8, ge=1)
    """Evaluation examples per process and forward pass."""
    eval_steps: int = Field(200, ge=1)
    """Evaluate every this many steps (and at the end)."""
    dataloader_num_workers: int = 0
    """Worker processes loading batches (0: in the training process)."""


class SFTConfig(TrainerStageConfig):
    """Supervised fine-tuning on the conversations of the export trees (loss on assistant tokens)."""

    system_prompt: str | None = None
    """A system message put before every conversation."""


class RMConfig(TrainerStageConfig):
    """Reward-model training on the (better, worse) pairs of the ranked reply groups."""

    val_fraction: float = _restated(StageConfig, "val_fraction", 0.1)
    learning_rate: float = _restated(StageConfig, "learning_rate", 8e-6)
    num_train_epochs: float = _restated(TrainerStageConfig, "num_train_epochs", 2.0)

    center_rewards_coefficient: float | None = None
    """Pull the mean reward towards 0 (Eisenstein et al.); None turns it off."""
    max_pairs_per_group: int | None = None
    """Cap on the pairs taken from one group (a group of k replies has k(k-1)/2); ``rm_loss: pairwise`` only."""
    rm_loss: Literal["pairwise", "kwise"] = "pairwise"
    """``pairwise``: trl's RewardTrainer on every (better, worse) pair, each reply encoded once per pair
    it is in, a group weighing as its number of pairs. ``kwise``: Open-Assistant's RMLoss, each group's
    replies (at most ``max_replies``) scored once in one batch, a group's loss the mean over its pairs
    of −log σ(r_better − r_worse) + score_l2_reg·½(r_better² + r_worse²), every group weighing the same;
    batches count groups."""
    max_replies: int = Field(5, ge=2)
    """``kwise``: the best this many replies of a group are scored (Open-Assistant's ``max_replies``)."""
    score_l2_reg: float = Field(0.001, ge=0)
    """``kwise``: weight of the scores' L2 penalty, which keeps them near 0 (Open-Assistant's RMLoss β)."""

    @field_validator("rm_loss")
    @classmethod
    def _pairwise_only_keys(cls, value: str, info: ValidationInfo) -> str:
        # Fields validate in order: the pairwise-only keys come first.
        if value == "kwise":
            for key in ("center_rewards_coefficient", "max_pairs_per_group"):
                if info.data.get(key) is not None:
                    raise ValueError(f"{key} is for rm_loss: pairwise (kwise scores whole groups; see score_l2_reg)")
        return value


TRITON_HOST_FORMAT = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}/[A-Za-z0-9_.\-]+$")


class RLConfig(StageConfig):
    """PPO against the reward model, with a KL penalty to the SFT model."""

    datasets: list[DatasetSpec] = _restated(StageConfig, "datasets", [DatasetSpec(path="sample")])
    learning_rate: float = _restated(StageConfig, "learning_rate", 1e-6)
    lr_scheduler_type: SchedulerName = _restated(StageConfig, "lr_scheduler_type", "constant")
    gradient_accumulation_steps: int = _restated(StageConfig, "gradient_accumulation_steps", 1)
    logging_steps: int = _restated(StageConfig, "logging_steps", 1)
    save_steps: int = _restated(StageConfig, "save_steps", 50)

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
    remote_timeout: float = Field(60.0, gt=0)
    """Seconds one call to a Triton server may take."""
    prompts: list[DatasetSpec] | None = None
    """Prompt sources: export files (their prompter turns) or a JSONL of ``{"prompt": ...}``;
    default: the stage's ``datasets``."""
    value_model: Literal["policy", "rm"] = "policy"
    """``policy``: a value head on the policy's trunk (one network, the memory of one model);
    ``rm``: a separate value network, the RM's trunk with a head started from its score head
    (a second trunk to train; the RM must share the policy's tokenizer)."""
    total_steps: int = Field(200, ge=1)
    """PPO steps (one rollout batch and its optimisation each)."""
    rollout_batch_size: int = Field(32, ge=1)
    """Prompts per step (per process)."""
    mini_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward pass in training (and per chunk when scoring); an optimizer
    step every ``gradient_accumulation_steps`` minibatches."""
    ppo_epochs: int = Field(4, ge=1)
    """Passes over each rollout batch."""
    max_new_tokens: int = Field(256, ge=1, le=MAX_TOKENS)
    """Longest response; a response that reaches it without EOS is cut there."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollouts (1: the policy's own distribution)."""
    top_k: int = 0
    """Sample from the k likeliest tokens only (0: all)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Sample from the smallest set of tokens whose probability reaches top_p (1: all)."""
    max_prompt_length: int = Field(512, ge=1, le=MAX_TOKENS)
    """Longest prompt, in tokens; longer ones keep their end."""
    cliprange: float = 0.2
    """PPO's ε: the probability ratio is clipped to [1 − ε, 1 + ε]."""
    cliprange_value: float = 0.2
    """Values may move at most this far from the rollout's values in the clipped value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (0: entropy is only measured)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per token in GAE (1: none)."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE's λ."""
    init_kl_coef: float = 0.05
    """Starting KL coefficient β (the whole time, without ``adaptive_kl``)."""
    adaptive_kl: bool = True
    """Ziegler et al.'s adaptive KL controller; off: the coefficient stays ``init_kl_coef``."""
    kl_target: float = Field(6.0, gt=0)
    """The adaptive controller's target for ``ppo/kl`` (summed over a response, in nats)."""
    kl_horizon: int = Field(10000, ge=1)
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
    ratio_threshold: float = Field(10.0, gt=0)
    """Skip a minibatch whose mean probability ratio exceeds this (an exploding update)."""
    samples_per_log: int = 4
    """Prompt/response/score triples written to ``samples.jsonl`` every ``logging_steps``."""
    eval_steps: int = Field(20, ge=0)
    """Judge the policy every this many steps (and before the first): greedy answers to a fixed set of
    held-out prompts (the sample's held-out questions when the prompts are the sample's, else those of
    ``val_fraction``), scored by the reward model (``eval/proxy``) and, where the prompts are the
    sample's, by the gold judge (``eval/gold``); also ``eval/eos_fraction`` and ``eval/kl``. 0: never."""
    eval_prompts: int = Field(32, ge=1)
    """How many held-out prompts ``eval_steps`` judges the policy on."""

    @field_validator("triton_host_rm", "triton_host_ref")
    @classmethod
    def _triton_host(cls, value: str | None) -> str | None:
        if value is not None and not TRITON_HOST_FORMAT.match(value):
            raise ValueError(f"{value!r} is not host:grpcport/model (e.g. localhost:8001/rm)")
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

#: Each stage's defaults section. The shipped ones name no keys (the schema above holds every
#: default); a workspace may replace one to change its defaults.
DEFAULT_SECTIONS = {"sft": "defaults", "rm": "defaults_rm", "rl": "defaults_rl"}


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
    shadowed: dict[str, Section] = field(default_factory=dict)
    """Sections replaced by a later folder's section of the same name (the replaced one)."""

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
    """A safe loader that remembers the line each top-level key starts on, and refuses documents
    nested too deep (the composer recurses per level) or whose aliases expand too far (a
    "billion laughs" document is a few hundred bytes)."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


MAX_YAML_DEPTH = 50
"""Deepest nesting accepted in a config file or a ``--set`` value."""
MAX_YAML_NODES = 100_000
"""Most values a config document may hold once its aliases are expanded."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values under ``node`` with every alias expanded (memoised: linear in the document's size)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = 1  # a node seen again while being counted (a recursive alias) counts once
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(key, sizes) + _expanded_size(value, sizes) for key, value in node.value)
    total = min(total, MAX_YAML_NODES + 1)
    sizes[id(node)] = total
    return total


def load_yaml(text: str, where: str) -> tuple[Any, yaml.Node | None]:
    """Parse ``text`` with the safe loader: ``(value, root node)``; every problem is one UserError
    naming ``where`` (and its line): malformed YAML, nesting too deep, aliases that expand too far."""
    try:
        loader = _LineLoader(text)
    except yaml.YAMLError as error:  # a character YAML does not allow
        raise UserError(f"{where}: malformed YAML: {str(error).splitlines()[0]}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise UserError(f"{where}: more than {MAX_YAML_NODES} values once its aliases are expanded")
        return loader.construct_document(node), node
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f"{where}:{mark.line + 1}" if mark is not None else where
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{place}: malformed YAML: {problem}") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deep") from None
    finally:
        loader.dispose()


def _read_sections(path: Path) -> list[Section]:
    try:
        text = read_text_file(path)
    except UnreadableFile as error:
        raise UserError(f"{error}") from None
    data, node = load_yaml(text, str(path))
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
        files = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
        if folder != SHIPPED_CONFIGS:
            # Config files choose what runs (model code, DeepSpeed settings): only the user's own.
            for checked in (folder, *files):
                reason = untrusted_reason(checked)
                if reason:
                    raise UserError(f"{checked}: refusing config files {reason}")
        seen_here: dict[str, Section] = {}
        for path in files:
            for section in _read_sections(path):
                if section.name in seen_here:
                    first = seen_here[section.name]
                    raise UserError(
                        f"{path}:{section.line}: section '{section.name}' is already defined in "
                        f"{first.file}:{first.line}"
                    )
                seen_here[section.name] = section
        for name in seen_here:
            if name in index.sections:
                index.shadowed[name] = index.sections[name]
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
    if not raw.strip():
        return key, ""
    try:
        value, _ = load_yaml(raw, f"--set {key}")
    except UserError as error:
        if "malformed YAML" in str(error):
            return key, raw  # not YAML: the text itself
        raise
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
        replaced = index.shadowed.get(name)
        if replaced is not None:
            print(f"oatui: note: section '{name}' from {section.file}:{section.line} replaces the one in "
                  f"{replaced.file}:{replaced.line}", file=sys.stderr)
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


_BOUNDS = ("gt", "ge", "lt", "le")
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _range_text(metadata: list[Any]) -> str:
    """A field's range constraints in words: ``at least 1``, ``above 0``, ``in [0, 1)``."""
    bounds = {name: getattr(item, name) for item in metadata for name in _BOUNDS if getattr(item, name, None) is not None}
    low = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    high = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'above' if low[0] == '(' else 'at least'} {low[1]}"
    if high:
        return f"{'below' if high[0] == ')' else 'at most'} {high[1]}"
    return ""


def _field_at(schema: type[BaseModel], location: tuple[Any, ...]) -> FieldInfo | None:
    """The field an error's location points at, through nested models (``datasets.0.fraction``)."""
    model: type[BaseModel] | None = schema
    info = None
    for part in location:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = next((arg for arg in _flatten(info.annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)), None)
    return info


def _flatten(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    return [annotation] if not args else [leaf for arg in args for leaf in _flatten(arg)]


def _short_repr(value: Any) -> str:
    """A bounded ``repr`` for error messages (a value may be huge, or nest deep)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxdict, short.maxlist, short.maxstring, short.maxother = 2, 4, 4, 40, 40
    text = short.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
        got_text = _short_repr(got)
        if first["type"] == "extra_forbidden" and len(location) > 1:
            what = f"unknown key '{location[-1]}'"
        elif first["type"] in ("value_error", "assertion_error"):
            what = first["msg"].removeprefix("Value error, ")
        elif first["type"] in _RANGE_ERRORS:
            info = _field_at(schema, location)
            what = "must be " + (_range_text(info.metadata) if info is not None else first["msg"])
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
        text = read_text_file(path)
    except UnreadableFile as error:
        raise UserError(f"{error}") from None
    data = load_yaml(text, str(path))[0] or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys to values")
    origin = {key: str(path) for key in data}
    return validate(stage, Composed(data, origin))


def deepspeed_config_path(name: str | None) -> str | None:
    """A DeepSpeed JSON config: a file, or a name from the shipped ``configs/deepspeed/``."""
    if not name:
        return None
    path = expand_user(name)
    if path.is_file():
        return str(path.absolute())
    candidate = SHIPPED_CONFIGS / "deepspeed" / f"{name}.json"
    if "/" not in name and candidate.is_file():
        return str(candidate)
    known = ", ".join(sorted(p.stem for p in (SHIPPED_CONFIGS / "deepspeed").glob("*.json")))
    raise UserError(f"deepspeed: {name!r} is neither a JSON file nor one of {known}")


@dataclass(frozen=True)
class KeyInfo:
    """One row of ``oatui train STAGE --list-keys`` (and one object of its ``--json``)."""

    key: str
    type: str
    default: Any
    """The value the stage's ``defaults*`` section resolves to, as ``--print-config`` writes it."""
    help: str


def stage_defaults(stage: str, workspace: Path | None = None) -> StageConfig:
    """What the stage's defaults section (``DEFAULT_SECTIONS``) resolves to: the schema's defaults,
    unless a section of that name in the workspace or ``$OATUI_CONFIG_PATH`` replaces the shipped one."""
    return load_stage_config(stage, [DEFAULT_SECTIONS[stage]], workspace=workspace)


def describe_keys(stage: str, workspace: Path | None = None) -> list[KeyInfo]:
    """Every key of the stage with its type, resolved default and help; the keys of one
    ``datasets`` entry follow as ``datasets[].KEY`` with the entry's own defaults."""
    schema = STAGE_SCHEMAS[stage]
    resolved = stage_defaults(stage, workspace).model_dump(mode="json")
    rows = []
    for name, info in schema.model_fields.items():
        rows.append(KeyInfo(name, _describe_type(info), resolved[name], _help(info)))
        if name == "datasets":
            for entry_key, entry_info in DatasetSpec.model_fields.items():
                default = None if entry_info.is_required() else entry_info.get_default()
                rows.append(KeyInfo(f"datasets[].{entry_key}", _describe_type(entry_info), default, _help(entry_info)))
    return rows


def _help(info: FieldInfo) -> str:
    return (info.description or "").replace("\n", " ")


def _describe_type(info: FieldInfo) -> str:
    if info.is_required():
        return f"{_type_name(info.annotation)}, required"
    bounds = _range_text(info.metadata)
    return f"{_type_name(info.annotation)}, {bounds}" if bounds else _type_name(info.annotation)
