"""The main screen's layout under the pilot: the Log tab wraps to the panel's width (again after a
resize and a zoom), a replay says so in the title and the GPU panel, a machine without GPUs gives
the GPU panel one line and the host panel the room, and the footer lists the moving-around keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.widgets._footer import FooterKey

from oatui.app import messages as m
from oatui.app.app import make_app

from test_app import RECORDING, Recorder, fake_run, run, screen_text, sft_metrics, until

WORDS = [f"w{index:03d}" for index in range(60)]
LONG_LINE = "step 10 kl_coef 0.0520 " + " ".join(WORDS) + " len train 1.3)"


def _run_with_a_long_line(workspace: Path) -> str:
    run_id = "rl-20261124-093000-5e1f"
    fake_run(workspace, run_id, stage="rl", metrics=sft_metrics(10),
             log=f"[oatui] rl run\n{LONG_LINE}\n[oatui] succeeded (exit status 0)\n")
    return run_id


def _log_is_whole(app: Any, on_screen: bool = True) -> None:
    """Every word of the long line is drawn (and on screen, when the panel is tall enough to hold
    the whole log), and no log line is wider than the panel."""
    log = app.run_log
    width = log.scrollable_content_region.width
    assert width > 20
    assert log.wrap_width == width
    assert all(strip.cell_length <= width for strip in log.lines)
    drawn = screen_text(app) if on_screen else "\n".join(strip.text for strip in log.lines)
    shown = " ".join(drawn.replace("│", " ").split())
    missing = [word for word in ["kl_coef", "0.0520", *WORDS, "len", "train", "1.3)"] if word not in shown]
    assert not missing, f"cut from the log at width {width}: {missing}"


def test_the_log_wraps_to_the_panel_again_on_resize_and_zoom(workspace: Path) -> None:
    _run_with_a_long_line(workspace)
    app = make_app(workspace, replay=RECORDING, refresh=3600)

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: app.run_log.line_count >= 3, pilot, what="the log")
            await pilot.pause(0.2)
            narrow = app.run_log.wrap_width
            assert narrow < 78  # the panel is narrower than RichLog's default width
            _log_is_whole(app)

            await pilot.resize_terminal(200, 50)
            await until(lambda: app.run_log.wrap_width > narrow, pilot, what="a wider wrap")
            await pilot.pause(0.2)
            _log_is_whole(app)
            wide = app.run_log.wrap_width

            app.run_log.focus()
            await pilot.press("z")
            await until(lambda: app.screen.maximized is not None, pilot, what="the zoomed log")
            await until(lambda: app.run_log.wrap_width > wide, pilot, what="a zoomed wrap")
            await pilot.pause(0.2)
            _log_is_whole(app)

            await pilot.press("z")
            await until(lambda: app.run_log.wrap_width == wide, pilot, what="the wrap after unzoom")
            _log_is_whole(app)

    run(drive())


def test_new_lines_wrap_to_the_panel_too(workspace: Path) -> None:
    run_id = _run_with_a_long_line(workspace)
    app = make_app(workspace, replay=RECORDING, refresh=0.2)

    async def drive() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(lambda: app.run_log.line_count >= 3, pilot, what="the log")
            with open(workspace / "runs" / run_id / "stdout.log", "a") as log:
                log.write("second " + LONG_LINE + "\n")
            await until(lambda: app.run_log.line_count >= 4, pilot, what="the appended line")
            await pilot.pause(0.2)
            _log_is_whole(app, on_screen=False)  # 80x24: the log's first lines are scrolled away
            assert sum(line == "second " + LONG_LINE for line in app.run_log.kept) == 1

    run(drive())


def test_a_replay_is_labelled_in_the_title_and_the_gpu_panel(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=3600)

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: app.snapshot is not None, pilot, what="a sample")
            await pilot.pause(0.2)
            assert app.title == f"oatui · replay of {RECORDING.name}"
            assert app.gpu_panel.border_title == f"GPUs · replay of {RECORDING.name}"
            text = screen_text(app)
            assert text.splitlines()[0].count(f"replay of {RECORDING.name}") == 1
            assert f"GPUs · replay of {RECORDING.name}" in text
            assert "Host · recorded" in text

    run(drive())


def test_this_machine_is_not_called_a_replay(workspace: Path) -> None:
    app = make_app(workspace, refresh=3600)

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: app.snapshot is not None, pilot, what="a sample")
            assert app.title == "oatui" and "replay" not in screen_text(app)

    run(drive())


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
def test_without_gpus_the_gpu_panel_is_one_line_and_the_host_gets_the_room(workspace: Path,
                                                                            size: tuple[int, int]) -> None:
    app = make_app(workspace, refresh=3600)  # the real sampler: no driver on this machine
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=size, message_hook=recorder.hook) as pilot:
            borders = 2 if size == (120, 40) else 1  # narrow: a top rule only
            await until(lambda: bool(recorder.of(m.GpuSampled)) and app.gpu_panel.outer_size.height == 1 + borders,
                        pilot, what="the one-line GPU panel")
            await pilot.pause(0.2)
            assert not app.snapshot.gpus and app.has_class("-no-gpus")
            notice = app.query_one("#gpu-notice")
            assert notice.outer_size.height == 1
            assert app.host_panel.outer_size.height > app.gpu_panel.outer_size.height
            text = screen_text(app)
            assert "No NVIDIA driver" in text
            for label in ("CPU", "MEM", "DISK"):
                assert label in text

    run(drive())


def test_with_gpus_the_gpu_panel_keeps_its_room(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=3600)

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: app.snapshot is not None, pilot, what="a sample")
            await pilot.pause(0.2)
            assert not app.has_class("-no-gpus")
            assert app.gpu_panel.outer_size.height > 20

    run(drive())


@pytest.mark.parametrize("size", [(200, 50), (120, 40), (80, 24)], ids=["200x50", "120x40", "80x24"])
def test_the_footer_shows_the_keys_to_move_around(workspace: Path, size: tuple[int, int]) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=3600)

    async def drive() -> None:
        async with app.run_test(size=size) as pilot:
            await until(lambda: "q Quit" in screen_text(app).splitlines()[-1], pilot, what="the footer")
            keys = {key.key for key in app.screen.query(FooterKey)}
            assert {"r", "l", "v", "z", "tab", "c", "g", "question_mark", "q", "1", "2", "3"} <= keys
            footer = screen_text(app).splitlines()[-1]
            for shown in ("r Runs", "l Log", "v Curves", "z Zoom", "tab Next", "1 2 3 Launch", "? Help", "q Quit"):
                assert shown in footer, (shown, footer)
            if size[0] >= 100:
                assert {"x", "e", "s"} <= keys

    run(drive())


def test_the_footer_follows_a_resize_between_wide_and_narrow(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=3600)

    def footer() -> str:
        return screen_text(app).splitlines()[-1]

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: "x Stop" in footer() and "q Quit" in footer(), pilot, what="the wide footer")
            await pilot.resize_terminal(80, 24)
            await until(lambda: "x Stop" not in footer() and "q Quit" in footer(), pilot, what="the narrow footer")
            assert "z Zoom" in footer() and "tab Next" in footer()
            await pilot.resize_terminal(120, 40)
            await until(lambda: "x Stop" in footer() and "q Quit" in footer(), pilot, what="the wide footer again")

    run(drive())


# -- the chat's room ------------------------------------------------------------------------------

def test_the_chat_zooms_with_z_after_esc_and_from_the_palette(workspace: Path) -> None:
    from textual.command import CommandPalette

    app = make_app(workspace, replay=RECORDING, refresh=3600)

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            pane = app.chat_pane
            await pilot.press("c")
            assert app.focused is app.query_one("#chat-prompt") and app.screen.maximized is None
            await pilot.press("escape")  # leaves the prompt for the transcript
            assert app.focused is not None and pane in app.focused.ancestors_with_self
            await pilot.press("z")
            assert app.screen.maximized is pane
            await pilot.press("z")
            assert app.screen.maximized is None

            await pilot.press("ctrl+p")
            assert isinstance(app.screen, CommandPalette)
            await pilot.press(*"zoom")
            await pilot.pause(0.5)
            await pilot.press("enter")
            await until(lambda: app.screen.maximized is pane, pilot, what="the chat zoomed from the palette")

    run(drive())


def test_the_chat_gets_the_width_at_120_columns(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=3600)

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("c")
            await pilot.pause(0.2)
            transcript = app.query_one("#chat-transcript")
            # Unzoomed, the transcript has more than half the screen (it had 34 of 120 columns).
            assert transcript.size.width >= 64, transcript.size
            assert not app.query_one("#chat-conversations").display
            assert app.gpu_panel.size.width >= 44  # the GPU columns still fit
            await pilot.press("escape", "l")  # the log: the columns share the width again
            await pilot.pause(0.2)
            assert abs(app.gpu_panel.outer_size.width - app.query_one("#detail").outer_size.width) <= 1
            await pilot.press("c", "escape", "z")  # zoomed: the conversation list comes back beside it
            await pilot.pause(0.2)
            assert app.query_one("#chat-conversations").display
            assert transcript.size.width >= 90

    run(drive())
