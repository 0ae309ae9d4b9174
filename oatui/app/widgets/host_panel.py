"""The host: CPU busy per core, load, memory, swap, the workspace's disk, uptime."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from oatui.monitor import History, HostSnapshot
from oatui.monitor.text import format_duration, format_percent, format_used_total, printable

_BARS = " ▁▂▃▄▅▆▇█"


def core_bars(percents: Sequence[float], room: int) -> str:
    """One bar per core; more cores than ``room`` are averaged in groups so that the bars fit."""
    if not percents:
        return ""
    room = max(1, room)
    group = -(-len(percents) // room)  # ceiling division
    values = [sum(percents[i:i + group]) / len(percents[i:i + group]) for i in range(0, len(percents), group)]
    return "".join(_BARS[min(8, max(0, round(value / 12.5)))] for value in values)


def host_text(host: HostSnapshot, width: int) -> Text:
    cores = len(host.cpu_percent)
    text = Text()
    text.append(printable(host.hostname) if host.hostname else "this host", style="bold")
    text.append(f"  up {format_duration(host.uptime)}")
    if host.load_average is not None:
        text.append("  load " + " ".join(f"{value:.2f}" for value in host.load_average))
    text.append("\n")
    text.append("CPU ", style="bold")
    text.append(f"{format_percent(host.cpu_percent_mean):>4} of {cores} ")
    text.append(core_bars(host.cpu_percent, width - 16))
    text.append("\n")
    text.append("MEM ", style="bold")
    text.append(format_used_total(host.memory_used, host.memory_total))
    if host.swap_total:
        text.append("  SWAP ", style="bold")
        text.append(format_used_total(host.swap_used, host.swap_total))
    text.append("\n")
    text.append("DISK ", style="bold")
    text.append(format_used_total(host.disk_used, host.disk_total))
    if host.disk_path:
        text.append(f" ({printable(host.disk_path)})")
    return text


class HostPanel(Vertical):
    """The machine the app runs on (or the recorded one, in a replay)."""

    BORDER_TITLE = "Host"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._key: object = None
        self._spark_key: object = None
        self._lines = -1
        self._text = Static(id="host-text")
        self._spark = Sparkline([], summary_function=max, id="host-cpu-history")

    def compose(self) -> ComposeResult:
        yield self._text
        yield self._spark

    def show(self, host: HostSnapshot, history: History) -> None:
        width = self.content_region.width or 80
        key = (host, width)
        if key != self._key:
            text = host_text(host, width)
            lines = text.plain.count("\n")
            self._text.update(text, layout=lines != self._lines)
            self._key, self._lines = key, lines
        series = tuple(0.0 if v is None else v for v in history.host("cpu_percent_mean")[-120:])
        if series != self._spark_key:
            self._spark_key = series
            self._spark.data = list(series)
