"""The app's import boundaries: the UI process never loads the training stack, and textual stays
inside oatui/app/."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "trl", "accelerate", "deepspeed")


def _loaded_after(code: str) -> list[str]:
    probe = code + (
        "\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m == 'textual')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_app_and_the_cli_import_none_of_the_training_stack() -> None:
    loaded = _loaded_after(
        "import oatui.app.app, oatui.cli\n"
        "oatui.cli.build_parser()\n"
        # What the app imports later, on demand: launching, stopping, the server, the chat client,
        # the chat store, the curves.
        "import oatui.stages.launcher, oatui.stages.runs, oatui.serve.server, oatui.serve.repository\n"
        "import oatui.serve.client, oatui.chat.history, oatui.config, textual_plotext\n"
        "from oatui.app.app import make_app\n"
        "make_app('/tmp/oatui-boundary-probe', replay='tests/data/recordings/8xh100.jsonl')\n"
    )
    assert [name for name in loaded if name != "textual" and not name.startswith("textual.")] == []
    assert "textual" in loaded


def test_the_layers_below_the_app_do_not_import_textual() -> None:
    loaded = _loaded_after(
        "import oatui.monitor, oatui.monitor.owners, oatui.stages.runs, oatui.stages.launcher, oatui.serve.server\n"
        "import oatui.chat.history, oatui.app.follow, oatui.app.choices\n"
    )
    assert "textual" not in loaded


def test_only_oatui_app_imports_textual() -> None:
    offenders = []
    for path in (REPO / "oatui").rglob("*.py"):
        if path.is_relative_to(REPO / "oatui" / "app"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            if any(name.split(".")[0] in ("textual", "textual_plotext") for name in names):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
