"""The GPU panel: one row per GPU with a utilization sparkline, MIG devices, and GPU processes.

The process table sorts by GPU, GPU memory, GPU utilization, pid or run (key o), and asks to stop
the run a highlighted process belongs to (key x: ``ProcessTable.StopAsked``; the app confirms and
stops it as the runs list does). Processes of no run of this workspace are never signalled.

It draws ``MonitorSnapshot`` objects handed to ``show()`` and nothing else; rows are rebuilt only
when the GPUs change, and each row's text and sparkline are updated only when their values do.
Without a driver the panel holds one sentence (the snapshot's ``notice``) and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Sparkline, Static

from oatui.monitor import GpuProcess, GpuSnapshot, History, MonitorSnapshot
from oatui.monitor.owners import Ownership
from oatui.monitor.text import NA, format_bytes, format_percent, format_rate_kb, format_used_total, printable

#: Samples drawn in each sparkline (the newest ones).
SPARK_SAMPLES = 120

# Row layouts by the room the panel has: which columns a GPU row shows.
COMPACT, MEDIUM, WIDE = "compact", "medium", "wide"


def layout_for(width: int) -> str:
    if width >= 120:
        return WIDE
    if width >= 84:
        return MEDIUM
    return COMPACT


def _short_name(name: str | None) -> str:
    text = printable(name)
    for prefix in ("NVIDIA ", "Tesla "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text[:16]


def _power(gpu: GpuSnapshot) -> str:
    if gpu.power_draw is None and gpu.power_limit is None:
        return NA
    draw = NA if gpu.power_draw is None else f"{gpu.power_draw:.0f}"
    limit = NA if gpu.power_limit is None else f"{gpu.power_limit:.0f}"
    return f"{draw}/{limit}W"


def _temperature(gpu: GpuSnapshot) -> str:
    return NA if gpu.temperature is None else f"{gpu.temperature:.0f}°C"


def _clocks(gpu: GpuSnapshot) -> str:
    sm = NA if gpu.clock_sm is None else str(gpu.clock_sm)
    mem = NA if gpu.clock_mem is None else str(gpu.clock_mem)
    return f"{sm}/{mem}"


def _pcie(gpu: GpuSnapshot) -> str:
    if gpu.pcie_rx is None and gpu.pcie_tx is None:
        return NA
    return f"↓{format_rate_kb(gpu.pcie_rx)} ↑{format_rate_kb(gpu.pcie_tx)}"


# (title, width, right-aligned, layouts that show it)
_COLUMNS: tuple[tuple[str, int, bool, tuple[str, ...]], ...] = (
    ("GPU", 3, True, (COMPACT, MEDIUM, WIDE)),
    ("NAME", 16, False, (MEDIUM, WIDE)),
    ("UTIL", 4, True, (COMPACT, MEDIUM, WIDE)),
    ("MEMORY", 14, True, (COMPACT, MEDIUM, WIDE)),
    ("TEMP", 5, True, (COMPACT, MEDIUM, WIDE)),
    ("POWER", 9, True, (COMPACT, MEDIUM, WIDE)),
    ("FAN", 4, True, (WIDE,)),
    ("SM/MEM MHz", 10, True, (MEDIUM, WIDE)),
    ("PCIE RX/TX", 22, True, (WIDE,)),
)


def _cells(gpu: GpuSnapshot) -> list[str]:
    return [
        str(gpu.index),
        _short_name(gpu.name),
        "MIG" if gpu.utilization_gpu is None and gpu.mig_mode else format_percent(gpu.utilization_gpu),
        format_used_total(gpu.memory_used, gpu.memory_total),
        _temperature(gpu),
        _power(gpu),
        format_percent(gpu.fan),
        _clocks(gpu),
        _pcie(gpu),
    ]


def _join(cells: Sequence[str], layout: str) -> str:
    parts = []
    for cell, (_, width, right, layouts) in zip(cells, _COLUMNS):
        if layout in layouts:
            cell = cell[:width]
            parts.append(cell.rjust(width) if right else cell.ljust(width))
    return " ".join(parts)


def gpu_header(layout: str) -> str:
    return _join([title for title, *_ in _COLUMNS], layout) + " UTIL HISTORY"


def gpu_text(gpu: GpuSnapshot, layout: str) -> Text:
    return Text(_join(_cells(gpu), layout))


def short_run_id(run_id: str) -> str:
    """``rl-20261124-093000-c2d9`` -> ``rl·c2d9``: enough to tell runs apart on a GPU row."""
    parts = run_id.split("-")
    if len(parts) >= 4 and parts[1].isdigit():
        return f"{parts[0]}·{parts[-1]}"
    return run_id[:12]


def owners_text(owners: Sequence[str]) -> Text:
    return Text("◆ " + " ".join(short_run_id(owner) for owner in owners), style="bold") if owners else Text("")


def _series(values: Sequence[float | None]) -> list[float]:
    return [0.0 if value is None else float(value) for value in values[-SPARK_SAMPLES:]]


class GpuRow(Horizontal):
    """One GPU: its numbers, then the history of its utilization."""

    DEFAULT_CSS = """
    GpuRow { height: 1; }
    GpuRow > .gpu-text { width: auto; }
    GpuRow > Sparkline { width: 1fr; min-width: 6; max-width: 60; margin-left: 1; }
    GpuRow > .gpu-owners { width: auto; margin-left: 1; }
    """

    def __init__(self, index: int) -> None:
        super().__init__(classes="gpu-row")
        self.index = index
        self._pending: tuple[GpuSnapshot, str, tuple[str, ...], tuple[float, ...]] | None = None
        self._text_key: tuple[object, ...] | None = None
        self._spark_key: tuple[float, ...] | None = None
        self._text = Static(classes="gpu-text")
        self._spark = Sparkline([], summary_function=max)
        self._owners = Static(classes="gpu-owners")

    def compose(self) -> ComposeResult:
        yield self._text
        yield self._spark
        yield self._owners

    def on_mount(self) -> None:
        self._apply()

    def show(self, gpu: GpuSnapshot, layout: str, owners: tuple[str, ...], history: Sequence[float | None]) -> None:
        self._pending = (gpu, layout, owners, tuple(_series(history)))
        if self.is_mounted:
            self._apply()

    def _apply(self) -> None:
        if self._pending is None:
            return
        gpu, layout, owners, series = self._pending
        key = (gpu, layout, owners)
        if key != self._text_key:
            # The columns have fixed widths: only a new layout or new owners can change the size.
            relayout = self._text_key is None or self._text_key[1:] != key[1:]
            self._text_key = key
            self._text.update(gpu_text(gpu, layout), layout=relayout)
            if relayout:
                self._owners.update(owners_text(owners))
                self.set_class(bool(owners), "-ours")
        if series != self._spark_key:
            self._spark_key = series
            self._spark.data = list(series)


#: The process table's orders (key o cycles them): (name, column sorted, what the title says).
SORTS: tuple[tuple[str, str, str], ...] = (
    ("gpu", "GPU", "by GPU"),
    ("memory", "GPU MEM", "by GPU memory, most first"),
    ("util", "GPU UTIL", "by GPU utilization, busiest first"),
    ("pid", "PID", "by pid"),
    ("run", "RUN", "by run, this workspace's first"),
)


@dataclass(frozen=True)
class ProcessRow:
    """One process on one GPU (or MIG device), as the table shows it."""

    key: str
    gpu: int
    mig: int | None
    pid: int
    gpu_memory: int | None
    #: Utilization of the GPU (or MIG device) the process runs on; NVML gives none per process here.
    utilization: float | None
    owner: str | None

    def sort_key(self, sort: str) -> tuple[object, ...]:
        place = (self.gpu, -1 if self.mig is None else self.mig, self.pid)
        if sort == "memory":
            return (-(self.gpu_memory if self.gpu_memory is not None else -1), *place)
        if sort == "util":
            return (-(self.utilization if self.utilization is not None else -1), *place)
        if sort == "pid":
            return (self.pid, *place)
        if sort == "run":
            return (self.owner is None, self.owner or "", *place)
        return place


def process_rows(snapshot: MonitorSnapshot, owners: Ownership, sort: str = "gpu") -> list[ProcessRow]:
    """Every process of every GPU, in the order ``sort`` (a name of ``SORTS``) says."""
    rows = []
    for gpu in snapshot.gpus:
        migs = {mig.index: mig for mig in gpu.mig_devices}
        for process in gpu.processes:
            where = str(gpu.index) if process.mig_index is None else f"{gpu.index}:{process.mig_index}"
            mig = migs.get(process.mig_index) if process.mig_index is not None else None
            utilization = mig.utilization_gpu if mig is not None else gpu.utilization_gpu
            rows.append(ProcessRow(f"{where}/{process.pid}", gpu.index, process.mig_index, process.pid,
                                   process.gpu_memory, utilization, owners.processes.get(process.pid)))
    return sorted(rows, key=lambda row: row.sort_key(sort))


class ProcessTable(DataTable):
    """Every process on every GPU; ours (the workspace's runs) marked with ◆ and the run id."""

    COLUMNS = ("GPU", "PID", "USER", "GPU MEM", "GPU UTIL", "RUN", "COMMAND")
    BINDINGS = [
        Binding("o", "cycle_sort", "Sort"),
        Binding("x", "stop_process", "Stop its run"),
    ]

    class StopAsked(Message):
        """Stop the run of the highlighted process: ``run_id`` None when it belongs to no run here."""

        def __init__(self, pid: int, run_id: str | None) -> None:
            super().__init__()
            self.pid = pid
            self.run_id = run_id

    class Sorted(Message):
        def __init__(self, sort: str) -> None:
            super().__init__()
            self.sort = sort

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, show_cursor=False, **kwargs)  # type: ignore[arg-type]
        self.sort = "gpu"
        self.rows_shown: list[ProcessRow] = []
        self._key: tuple[str, ...] | None = None
        self._cells_by_key: dict[str, tuple[Text, ...]] = {}
        self._last: tuple[MonitorSnapshot, Ownership] | None = None

    def on_mount(self) -> None:
        self._add_columns()

    def _add_columns(self) -> None:
        sorted_column = next(column for name, column, _ in SORTS if name == self.sort)
        for name in self.COLUMNS:
            # The sorted column says so in its title, with an arrow for the direction.
            arrow = {"memory": " ▼", "util": " ▼", "pid": " ▲", "run": " ▲"}.get(self.sort, "")
            label = f"{name}{arrow}" if name == sorted_column and arrow else name
            self.add_column(Text(label, style="bold underline" if name == sorted_column else ""), key=name)

    def on_focus(self) -> None:
        self.show_cursor = True

    def on_blur(self) -> None:
        self.show_cursor = False

    @property
    def highlighted_row(self) -> ProcessRow | None:
        row = self.cursor_row
        return self.rows_shown[row] if self.rows_shown and 0 <= row < len(self.rows_shown) else None

    def show(self, snapshot: MonitorSnapshot, owners: Ownership) -> int:
        """Draw the processes; returns how many there are. Same processes: cells change in place."""
        self._last = (snapshot, owners)
        processes = {(gpu.index, process.pid, process.mig_index): process
                     for gpu in snapshot.gpus for process in gpu.processes}
        shown = process_rows(snapshot, owners, self.sort)
        rows = [(row.key, self._cells(row, processes[(row.gpu, row.pid, row.mig)])) for row in shown]
        self.rows_shown = shown
        keys = tuple(key for key, _ in rows)
        if keys == self._key:
            for key, cells in rows:
                old = self._cells_by_key.get(key)
                if old == cells:
                    continue
                for column, (before, after) in enumerate(zip(old or (), cells)):
                    if before != after:
                        self.update_cell(key, self.COLUMNS[column], after,
                                         update_width=len(after) > len(before))
                self._cells_by_key[key] = cells
            return len(rows)
        # Another set or order of rows: the cursor stays on the process it was on.
        highlighted = self._key[self.cursor_row] if self._key and 0 <= self.cursor_row < len(self._key) else None
        self._key = keys
        self._cells_by_key = dict(rows)
        self.clear()
        for key, cells in rows:
            self.add_row(*cells, key=key)
        if highlighted in keys:
            self.move_cursor(row=keys.index(highlighted), animate=False)
        return len(rows)

    def action_cycle_sort(self) -> None:
        names = [name for name, _, _ in SORTS]
        self.sort = names[(names.index(self.sort) + 1) % len(names)]
        highlighted = self.highlighted_row
        self.clear(columns=True)
        self._add_columns()
        self._key = None
        if self._last is not None:
            self.show(*self._last)
            keys = [row.key for row in self.rows_shown]
            if highlighted is not None and highlighted.key in keys:
                self.move_cursor(row=keys.index(highlighted.key), animate=False)
        self.post_message(self.Sorted(self.sort))

    def action_stop_process(self) -> None:
        row = self.highlighted_row
        if row is not None:
            self.post_message(self.StopAsked(row.pid, row.owner))

    @staticmethod
    def _cells(row: ProcessRow, process: GpuProcess) -> tuple[Text, ...]:
        owner = row.owner
        style = "bold" if owner else ""
        where = str(row.gpu) if row.mig is None else f"{row.gpu}:{row.mig}"
        return (
            Text(where, style=style, justify="right"),
            Text(str(process.pid), style=style, justify="right"),
            Text(printable(process.user), style=style),
            Text(format_bytes(process.gpu_memory), style=style, justify="right"),
            Text(format_percent(row.utilization), style=style, justify="right"),
            Text(f"◆ {owner}" if owner else "", style=style),
            Text(printable(process.command)[:160], style=style),
        )


def processes_title(sort: str) -> str:
    return f"Processes · {next(title for name, _, title in SORTS if name == sort)} (o: sort, x: stop its run)"


def mig_text(snapshot: MonitorSnapshot) -> Text:
    text = Text()
    for gpu in snapshot.gpus:
        for mig in gpu.mig_devices:
            if text:
                text.append("\n")
            name = printable(mig.name)
            profile = name.rsplit(" MIG ", 1)[-1] if " MIG " in name else name
            text.append(f"GPU {gpu.index} MIG {mig.index} ", style="bold")
            text.append(
                f"{profile:<8} GI {mig.gpu_instance_id if mig.gpu_instance_id is not None else NA} "
                f"CI {mig.compute_instance_id if mig.compute_instance_id is not None else NA}  "
                f"{format_used_total(mig.memory_used, mig.memory_total)}  "
                f"util {format_percent(mig.utilization_gpu)}"
            )
    return text


class GpuPanel(VerticalScroll):
    """Every GPU of the snapshot (or the notice that there are none), MIG devices and processes."""

    ALLOW_MAXIMIZE = True
    BORDER_TITLE = "GPUs"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.snapshot: MonitorSnapshot | None = None
        self.owners: Ownership = Ownership({}, {})
        self.history: History | None = None
        self.layout_name = COMPACT
        self._gpu_indices: tuple[int, ...] | None = None
        self._notice: object = "waiting"
        self._mig_key: object = None
        self._header_layout: str | None = None
        # Children are reached by reference: a sample may arrive while the app tears them down.
        self._notice_view = Static("Waiting for the first sample…", id="gpu-notice")
        self._header = Static(id="gpu-header", classes="-hidden")
        self._rows = Vertical(id="gpu-rows")
        self._mig = Static(id="gpu-mig", classes="-hidden")
        self._processes_title = Static(processes_title("gpu"), id="gpu-processes-title",
                                       classes="section-title -hidden")
        self._processes = ProcessTable(id="gpu-processes", classes="-hidden")

    def compose(self) -> ComposeResult:
        yield self._notice_view
        yield self._header
        yield self._rows
        yield self._mig
        yield self._processes_title
        yield self._processes

    @property
    def process_table(self) -> ProcessTable:
        return self._processes

    def on_process_table_sorted(self, message: ProcessTable.Sorted) -> None:
        self._processes_title.update(processes_title(message.sort))

    def on_resize(self) -> None:
        layout = layout_for(self.scrollable_content_region.width)
        if layout != self.layout_name:
            self.layout_name = layout
            if self.snapshot is not None:
                self._draw()

    def show(self, snapshot: MonitorSnapshot, owners: Ownership, history: History) -> None:
        self.snapshot, self.owners, self.history = snapshot, owners, history
        self._draw()

    def _draw(self) -> None:
        snapshot, history = self.snapshot, self.history
        assert snapshot is not None and history is not None
        notice = printable(snapshot.notice) if snapshot.notice else None
        if not snapshot.gpus and notice is None:
            notice = "No GPUs."
        if notice != self._notice:
            self._notice = notice
            widget = self._notice_view
            widget.update(notice or "")
            widget.set_class(notice is None, "-hidden")
        indices = tuple(gpu.index for gpu in snapshot.gpus)
        rows = self._rows
        if indices != self._gpu_indices:
            self._gpu_indices = indices
            rows.remove_children()
            rows.mount_all([GpuRow(index) for index in indices])
        self._draw_rows()
        header = self._header
        if self._header_layout != self.layout_name:
            self._header_layout = self.layout_name
            header.update(Text(gpu_header(self.layout_name), style="bold"))
        header.set_class(not snapshot.gpus, "-hidden")
        mig_key = tuple((gpu.index, gpu.mig_devices) for gpu in snapshot.gpus if gpu.mig_devices)
        if mig_key != self._mig_key:
            lines = sum(len(devices) for _, devices in mig_key)
            previous = sum(len(devices) for _, devices in self._mig_key) if isinstance(self._mig_key, tuple) else -1
            self._mig_key = mig_key
            mig = self._mig
            mig.update(mig_text(snapshot), layout=lines != previous)
            mig.set_class(not mig_key, "-hidden")
        table = self._processes
        count = table.show(snapshot, self.owners)
        table.set_class(not count, "-hidden")
        self._processes_title.set_class(not count, "-hidden")

    def _draw_rows(self) -> None:
        snapshot, history = self.snapshot, self.history
        if snapshot is None or history is None:
            return
        for row in self._rows.query_children(GpuRow):
            gpu = snapshot.gpu(row.index)
            if gpu is not None:
                row.show(gpu, self.layout_name, self.owners.gpus.get(row.index, ()),
                         history.gpu(row.index, "utilization_gpu"))
