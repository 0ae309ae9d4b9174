"""The workspace: one folder holding runs, models, data, the Triton repository, logs and chats."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from oatui.errors import UserError
from oatui.fsutil import make_private_dir

FEEDBACK_FILE = Path("data") / "feedback.trees.jsonl"
"""Rankings made while chatting, relative to the workspace: the ``feedback`` dataset."""


def default_workspace() -> Path:
    return Path(os.environ.get("OATUI_WORKSPACE") or "workspace")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None, create: bool = True) -> "Workspace":
        path = Path(root) if root is not None else default_workspace()
        path = path.expanduser().absolute()
        if path.exists() and not path.is_dir():
            raise UserError(f"--workspace {path}: not a folder")
        if create:
            try:
                make_private_dir(path)
            except OSError as error:
                raise UserError(f"--workspace {path}: cannot create it: {error.strerror or error}") from None
        return cls(path)

    def _sub(self, name: str) -> Path:
        return make_private_dir(self.root / name)

    @property
    def runs(self) -> Path:
        return self._sub("runs")

    @property
    def models(self) -> Path:
        """Models oatui creates itself (the tiny default) live here."""
        return self._sub("models")

    @property
    def data(self) -> Path:
        return self._sub("data")

    @property
    def triton_repo(self) -> Path:
        return self._sub("triton")

    @property
    def logs(self) -> Path:
        return self._sub("logs")

    @property
    def configs(self) -> Path:
        """User config files in here join the shipped ones (same section names win here)."""
        return self._sub("configs")

    @property
    def state(self) -> Path:
        """Small files the app and the server supervisor keep between sessions."""
        return self._sub("state")

    @property
    def feedback_file(self) -> Path:
        return self.data / FEEDBACK_FILE.name

    @property
    def chat_db(self) -> Path:
        return self.state / "chats.sqlite"
