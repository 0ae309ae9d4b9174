"""The workspace: one folder holding runs, models, data, the Triton repository, logs and chats."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from oatui.errors import UserError
from oatui.fsutil import expand_user, make_private_dir, untrusted_reason

FEEDBACK_FILE = Path("data") / "feedback.trees.jsonl"
"""Rankings made while chatting, relative to the workspace: the ``feedback`` dataset."""


def default_workspace() -> Path:
    return Path(os.environ.get("OATUI_WORKSPACE") or "workspace")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None, create: bool = True) -> "Workspace":
        if root is not None and not str(root).strip():
            raise UserError("--workspace: empty; name a folder")
        path = Path(root) if root is not None else default_workspace()
        if str(path).startswith("~") and expand_user(path) == path:
            raise UserError(f"--workspace {path}: no such user's home folder")
        path = expand_user(path).absolute()
        if path.exists() and not path.is_dir():
            raise UserError(f"--workspace {path}: not a folder")
        # Its configs and checkpoints choose what code runs: refuse a folder someone else controls,
        # as OpenSSH refuses a key file with loose modes.
        reason = untrusted_reason(path)
        if reason:
            raise UserError(f"--workspace {path}: refusing a workspace {reason}")
        if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"--workspace {path}: not writable by you")
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
