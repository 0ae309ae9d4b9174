"""Config sections: composition in order, --set, and one clear line per mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from oatui.cli import main
from oatui.config import (
    DEFAULT_SECTIONS, STAGE_SCHEMAS, RLConfig, compose, load_index, load_stage_config, parse_set, to_yaml,
)
from oatui.errors import UserError


def test_sections_compose_in_order_and_set_wins() -> None:
    config = load_stage_config("sft", ["defaults", "tiny"], ["learning_rate=3e-4", "max_steps=7"])
    assert config.model_name == "tiny"
    assert config.max_length == 128  # from tiny, over defaults' 512
    assert config.learning_rate == pytest.approx(3e-4) and config.max_steps == 7
    assert load_stage_config("sft", ["tiny", "pythia-1.4b"]).max_length == 2048
    assert load_stage_config("sft", ["pythia-1.4b", "tiny"]).max_length == 128


def test_every_stage_ships_defaults_a_tiny_set_and_real_model_sets() -> None:
    names = load_index().names()
    for required in ["defaults", "defaults_rm", "defaults_rl", "tiny", "tiny_rm", "tiny_rl",
                     "pythia-1.4b", "pythia-12b", "oasst-rm-pythia-1.4b"]:
        assert required in names
    assert load_stage_config("sft", ["defaults", "pythia-12b"]).deepspeed == "zero3"
    assert load_stage_config("rm", ["defaults_rm", "oasst-rm-pythia-1.4b"]).model_name.startswith("EleutherAI/")
    assert isinstance(load_stage_config("rl", ["defaults_rl", "tiny_rl"]), RLConfig)
    lora = load_stage_config("sft", ["defaults", "pythia-1.4b-lora-8bit"])
    assert lora.peft_model and lora.load_in_8bit and lora.optimizer == "adamw_8bit"


@pytest.mark.parametrize(
    ("names", "overrides", "message"),
    [
        (["defaults", "tinny"], [], "unknown config section 'tinny' (did you mean 'tiny'?); available: defaults,"),
        (["defaults"], ["lerning_rate=1"], "unknown key 'lerning_rate' for the sft stage, from --set lerning_rate=1; did you mean 'learning_rate'?"),
        (["defaults"], ["learning_rate=fast"], "learning_rate: expected a number, got 'fast', from --set learning_rate=fast"),
        (["defaults"], ["dtype=fp8"], "dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16'"),
        (["defaults"], ["max_steps=[1]"], "max_steps: expected an integer"),
        (["defaults"], ["datasets=[{path: a, weight: 2}]"], "datasets.0.weight: unknown key 'weight'"),
        (["defaults"], ["novalue"], "--set novalue: expected key=value"),
        (["defaults_rm"], ["center_rewards_coeficient=0.1"], "did you mean 'center_rewards_coefficient'"),
        (["defaults"], ["lr_scheduler_type=cosin"], "lr_scheduler_type: expected one of 'linear', 'cosine',"),
        (["defaults"], ["per_device_train_batch_size=0"], "per_device_train_batch_size: must be at least 1, got 0"),
        (["defaults"], ["warmup_ratio=1.5"], "warmup_ratio: must be in [0, 1), got 1.5"),
        # The RL stage counts PPO steps: the Trainer's epoch and batch keys are not its keys.
        (["defaults_rl"], ["num_train_epochs=2"], "unknown key 'num_train_epochs' for the rl stage"),
        (["defaults_rl"], ["max_steps=10"], "unknown key 'max_steps' for the rl stage, from --set max_steps=10; did you mean 'total_steps'?"),
    ],
)
def test_mistakes_are_one_line(names: list[str], overrides: list[str], message: str) -> None:
    stage = {"defaults_rm": "rm", "defaults_rl": "rl"}.get(names[0], "sft")
    with pytest.raises(UserError) as caught:
        load_stage_config(stage, names, overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_key_in_a_file_names_file_and_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "mine.yaml").write_text("mine:\n  model_name: tiny\n  eval_step: 3\n")
    monkeypatch.setenv("OATUI_CONFIG_PATH", str(folder))
    with pytest.raises(UserError) as caught:
        load_stage_config("sft", ["defaults", "mine"])
    assert f"unknown key 'eval_step' for the sft stage, from section 'mine' ({folder / 'mine.yaml'}:1); did you mean 'eval_steps'?" == str(caught.value)


def test_malformed_yaml_names_the_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "broken.yaml").write_text("ok:\n  a: 1\nbroken:\n  b: [1, 2\n  c: 3\n")
    monkeypatch.setenv("OATUI_CONFIG_PATH", str(folder))
    with pytest.raises(UserError) as caught:
        load_index()
    assert str(caught.value).startswith(f"{folder / 'broken.yaml'}:") and "malformed YAML" in str(caught.value)


def test_workspace_sections_replace_shipped_ones(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "local.yaml").write_text("tiny:\n  max_length: 64\n")
    assert load_stage_config("sft", ["defaults", "tiny"], workspace=tmp_path).max_length == 64


def test_set_values_are_read_as_yaml() -> None:
    assert parse_set("a=3") == ("a", 3)
    assert parse_set("a=true") == ("a", True)
    assert parse_set("a=null") == ("a", None)
    assert parse_set("a=x=y") == ("a", "x=y")
    assert parse_set("a=[1, 2]") == ("a", [1, 2])


def test_resolved_config_round_trips() -> None:
    config = load_stage_config("rm", ["defaults_rm", "tiny_rm"])
    again = load_stage_config("rm", [], [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                        for k, v in yaml.safe_load(to_yaml(config)).items()])
    assert again == config
    assert compose(["tiny"]).origin["max_length"].startswith("section 'tiny'")


def test_cli_config_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "sft", "--configs", "defaults", "nope", "--workspace", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown config section 'nope'" in err
    code = main(["train", "sft", "--configs", "defaults", "--set", "model_name=/no/such/model", "--workspace", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "/no/such/model" in err
    code = main(["train", "sft", "--configs", "defaults", "tiny", "--gpus", "99", "--workspace", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--gpus 99: GPU 99 does not exist" in err
    code = main(["train", "sft", "--configs", "defaults", "--set", "datasets=[{path: missing.jsonl}]", "--workspace", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "missing.jsonl: no such file" in err
    assert not list((tmp_path / "runs").glob("*")), "a rejected launch must not leave a run behind"


@pytest.mark.parametrize(("stage", "section"), [("sft", "defaults"), ("rm", "defaults_rm"), ("rl", "defaults_rl")])
def test_list_keys_defaults_are_what_the_defaults_section_prints(
    stage: str, section: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    workspace = tmp_path / "ws"
    assert main(["train", stage, "--list-keys", "--json", "--workspace", str(workspace)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(set(row) == {"key", "type", "default", "help"} for row in rows)
    listed = {row["key"]: row["default"] for row in rows if "[]" not in row["key"]}
    assert main(["train", stage, "--configs", section, "--print-config", "--workspace", str(workspace)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert listed == printed
    assert all(row["help"] for row in rows), "every key has a meaning"
    assert not workspace.exists(), "--list-keys and --print-config make no workspace and no run"


def test_the_schema_is_the_one_source_of_defaults() -> None:
    index = load_index()
    for stage, section in DEFAULT_SECTIONS.items():
        assert index.sections[section].values == {}, f"defaults belong in the {stage} schema, not in '{section}'"
        assert load_stage_config(stage, [section]) == STAGE_SCHEMAS[stage]()


def test_list_keys_and_print_config_follow_the_workspace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("defaults_rl:\n  total_steps: 7\n")
    assert main(["train", "rl", "--list-keys", "--json", "--workspace", str(tmp_path)]) == 0
    assert {row["key"]: row["default"] for row in json.loads(capsys.readouterr().out)}["total_steps"] == 7
    assert main(["train", "rl", "--configs", "defaults_rl", "tiny_rl", "--set", "ppo_epochs=3", "--print-config",
                 "--workspace", str(tmp_path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["total_steps"], printed["ppo_epochs"], printed["max_new_tokens"]) == (40, 3, 48)
    assert main(["train", "rl", "--list-keys", "--workspace", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "total_steps" in text and "an integer, at least 1" in text and "default 7" in text
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "sft", "--json"], "--json goes with --list-keys"),
        (["train", "sft", "--print-config", "--configs", "defaults", "--set", "top_p=1"], "unknown key 'top_p' for the sft stage"),
        (["train", "rl", "--print-config", "--configs", "defaults_rl", "--set", "top_p=1.5"], "top_p: must be in (0, 1], got 1.5"),
        (["train", "rl", "--print-config", "--set", "learning_rate=0"], "learning_rate: must be above 0, got 0"),
        (["train", "rl", "--print-config", "--set", "gamma=-0.1"], "gamma: must be in [0, 1], got -0.1"),
        (["train", "sft", "--print-config", "--set", "datasets=[{path: sample, fraction: 0}]"], "datasets.0.fraction: must be above 0, got 0"),
        (["train", "sft", "--print-config", "--resume", "sft-1"], "--print-config does not go with --resume"),
    ],
)
def test_describe_mistakes_exit_2_with_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([*argv, "--workspace", str(tmp_path / "ws")]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and not captured.out
