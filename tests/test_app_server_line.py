"""The app against a real tritonserver serving a policy exported from a run (an untrained tiny model
in the run's final/): the server line above the footer and the chat header name the run behind the
served model and its step; s asks before it stops the server, e before it replaces an export; rank
mode from the main screen at 80x24 samples on the first Enter, shows each answer from its start,
and saves the ranking under the run's id."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from oatui.app import messages as m
from oatui.app.app import make_app
from oatui.app.widgets.dialogs import ConfirmDialog
from oatui.app.widgets.rank_panel import RankPanel
from oatui.app.widgets.round_panel import RoundPhase
from oatui.netutil import free_ports
from oatui.serve import server
from oatui.serve.record import ServerOptions
from oatui.serve.repository import EXPORT_INFO, export_model, read_export_source
from oatui.workspace import Workspace

from test_app import RECORDING, Recorder, fake_run, run, screen_text, sft_metrics, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RUN_ID = "sft-20261124-093000-5e1f"
STEPS = 40


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A workspace with one finished SFT run, its final model exported as 'policy' and served."""
    from oatui.models.tiny import TINY_SHAPE, build_tiny_model

    ws = Workspace.open(tmp_path_factory.mktemp("serverline") / "ws")
    run_path = fake_run(ws.root, RUN_ID, metrics=sft_metrics(STEPS))
    build_tiny_model(run_path / "final", TINY_SHAPE)
    export_model("policy", run_path / "final", ws.triton_repo)
    ports = dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3)))
    server.start_detached(ws, ServerOptions(repo=str(ws.triton_repo), **ports))
    yield ws, ports
    server.stop(ws)


def _app(ws: Workspace, ports: dict[str, int]) -> Any:
    return make_app(ws.root, replay=RECORDING, refresh=0.5, server_options=ports)


async def _ready(app: Any, pilot: Any) -> None:
    await until(lambda: app.chat_pane.server is not None and "policy" in app.chat_pane.models, pilot, timeout=30,
                what="the app to find the server")
    await pilot.pause(0.1)


def _server_line(app: Any) -> str:
    return str(app.server_line.render())


def test_the_export_records_its_run_and_the_server_its_models_runs(served) -> None:  # noqa: ANN001
    ws, _ = served
    info = json.loads((ws.triton_repo / "policy" / EXPORT_INFO).read_text())
    assert (info["run_id"], info["step"]) == (RUN_ID, STEPS)
    running = server.status(ws)
    assert running is not None
    assert running.model_runs == {"policy": RUN_ID} and running.model_steps == {"policy": STEPS}
    assert running.served_label("policy") == f"policy ({RUN_ID} step {STEPS})"


def test_the_server_line_and_the_chat_header_name_the_served_run(served) -> None:  # noqa: ANN001
    ws, ports = served
    app = _app(ws, ports)

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await _ready(app, pilot)
            # On the main screen, whatever the tab: state, address, each model and its run.
            line = _server_line(app)
            assert line == f"Server ● ready 127.0.0.1:{ports['grpc_port']}  policy ← {RUN_ID} step {STEPS}"
            assert line in screen_text(app)
            await pilot.press("v")  # the curves: the line stays
            await pilot.pause(0.1)
            assert line in screen_text(app)
            await pilot.press("c")
            await pilot.pause(0.1)
            header = str(app.query_one("#chat-status").render())
            assert header.startswith(f"● policy ({RUN_ID} step {STEPS}) @ 127.0.0.1:{ports['grpc_port']}")

            await pilot.resize_terminal(80, 24)
            await pilot.press("escape")
            await pilot.pause(0.2)
            assert f"Server ● ready 127.0.0.1:{ports['grpc_port']}  policy ← sft-" in screen_text(app)

    run(drive())


def test_e_asks_before_replacing_the_served_export(served) -> None:  # noqa: ANN001
    ws, ports = served
    export_info = ws.triton_repo / "policy" / EXPORT_INFO
    before = export_info.read_text()
    app = _app(ws, ports)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=(120, 40), message_hook=recorder.hook) as pilot:
            await _ready(app, pilot)
            await until(lambda: app.run_list.selected is not None, pilot, what="the run")
            for no in ("n", "escape"):
                await pilot.press("e")
                dialog = app.screen
                assert isinstance(dialog, ConfirmDialog)
                text = screen_text(app)
                assert "Replace the exported 'policy'?" in text
                assert f"{RUN_ID} step {STEPS}" in dialog.detail and "keeps serving the old one" in dialog.detail
                await pilot.press(no)
                assert not isinstance(app.screen, ConfirmDialog)
            await pilot.pause(0.5)
            assert not recorder.of(m.ExportFinished) and export_info.read_text() == before

            await pilot.press("e", "y")
            await until(lambda: recorder.of(m.ExportFinished), pilot, timeout=300, what="the export")
            assert recorder.of(m.ExportFinished)[0].ok, recorder.of(m.ExportFinished)[0].detail

    run(drive())
    after = json.loads(export_info.read_text())
    assert export_info.read_text() != before and (after["run_id"], after["step"]) == (RUN_ID, STEPS)


def test_rank_mode_from_the_main_screen_at_80x24(served) -> None:  # noqa: ANN001
    ws, ports = served
    app = _app(ws, ports)
    recorder = Recorder(app)
    prompt = "How do I bake bread?"

    async def drive() -> None:
        async with app.run_test(size=(80, 24), message_hook=recorder.hook) as pilot:
            pane = app.chat_pane
            await _ready(app, pilot)
            assert app.focused is app.run_list
            await pilot.press("ctrl+r")  # from the runs list: the chat opens in rank mode
            assert pane.rank_mode and app.screen.maximized is pane
            assert app.focused is pane.query_one("#chat-prompt")
            pane.settings = replace(pane.settings, max_new_tokens=400, ignore_eos=True)
            await pilot.press(*prompt, "enter")  # the first Enter samples
            panel = pane.round_panel
            assert isinstance(panel, RankPanel) and pane.phase is not RoundPhase.IDLE
            await until(lambda: recorder.of(m.RankSamplingFinished), pilot, timeout=120, what="the answers")
            assert recorder.of(m.RankSamplingFinished)[0].state == "complete"
            await pilot.pause(0.2)
            card = panel.cards[0]
            assert card.max_scroll_y > 0  # longer than its box
            assert card.scroll_y == 0  # shown from its start
            assert " ".join(panel.texts[0].split()[:2]) in " ".join(screen_text(app).split())
            await pilot.press("enter")
            await until(lambda: recorder.of(m.RankingSaved), pilot, timeout=30, what="the ranking")

    run(drive())
    tree = json.loads(ws.feedback_file.read_text().splitlines()[-1])
    assert tree["prompt"]["text"] == prompt
    assert {reply["model_name"] for reply in tree["prompt"]["replies"]} == {RUN_ID}


def test_s_asks_before_stopping_the_server(served) -> None:  # noqa: ANN001
    ws, ports = served
    app = _app(ws, ports)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=(120, 40), message_hook=recorder.hook) as pilot:
            await _ready(app, pilot)
            for no in ("n", "escape"):
                await pilot.press("s")
                dialog = app.screen
                assert isinstance(dialog, ConfirmDialog) and dialog.question == "Stop tritonserver?"
                assert f"policy ({RUN_ID} step {STEPS})" in dialog.detail
                await pilot.press(no)
                assert not isinstance(app.screen, ConfirmDialog)
            await pilot.pause(0.5)
            assert not recorder.of(m.ServerStopped) and server.status(ws) is not None
            assert "● ready" in _server_line(app)

            await pilot.press("s", "y")
            assert "stopping…" in _server_line(app)
            await until(lambda: recorder.of(m.ServerStopped), pilot, timeout=60, what="the server to stop")
            assert server.status(ws) is None
            assert _server_line(app).startswith("Server ○ not running")

            await pilot.press("s")  # starting asks nothing
            assert not isinstance(app.screen, ConfirmDialog)
            await until(lambda: recorder.of(m.ServerStarted), pilot, timeout=120, what="the server to start")
            assert read_export_source(ws.triton_repo / "policy").run_id == RUN_ID
            assert _server_line(app).endswith(f"policy ← {RUN_ID} step {STEPS}")

    run(drive())
    assert server.status(ws) is not None
