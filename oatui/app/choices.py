"""What the launch forms remember per stage, in ``WORKSPACE/state/app-launch.json``.

A file that is missing, unreadable or edited into nonsense reads as "nothing remembered"; the
shipped defaults then fill the form.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from oatui.fsutil import atomic_write_json, locked

CHOICES_FILE = "app-launch.json"
DEFAULT_SECTIONS = {"sft": "defaults tiny", "rm": "defaults_rm tiny_rm", "rl": "defaults_rl tiny_rl"}
STAGE_NAMES = {"sft": "SFT", "rm": "RM", "rl": "RL"}


@dataclass(frozen=True)
class LaunchChoice:
    configs: str
    overrides: str = ""
    launcher: str = "auto"
    gpus: str = ""

    @classmethod
    def default(cls, stage: str) -> LaunchChoice:
        return cls(configs=DEFAULT_SECTIONS[stage])


def choices_path(state_dir: Path) -> Path:
    return Path(state_dir) / CHOICES_FILE


def load_choice(state_dir: Path, stage: str) -> LaunchChoice:
    try:
        data = json.loads(choices_path(state_dir).read_text(encoding="utf-8"))
        entry = data[stage]
        return LaunchChoice(
            configs=str(entry["configs"]),
            overrides=str(entry.get("overrides", "")),
            launcher=str(entry.get("launcher", "auto")),
            gpus=str(entry.get("gpus", "")),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return LaunchChoice.default(stage)


def save_choice(state_dir: Path, stage: str, choice: LaunchChoice) -> None:
    path = choices_path(state_dir)
    with locked(path):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[stage] = asdict(choice)
        atomic_write_json(path, data)
