"""Plain-text rendering of a snapshot (the table of ``oatui gpus``) and the unit formatters."""

from __future__ import annotations

import time
from collections.abc import Sequence

from oatui.monitor.snapshot import GpuSnapshot, HostSnapshot, MonitorSnapshot

NA = "N/A"
_GIB = 1 << 30


def format_bytes(value: float | None) -> str:
    """1536 -> "1.5 KiB"; None -> "N/A"."""
    if value is None:
        return NA
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_used_total(used: float | None, total: float | None) -> str:
    """Used and total bytes in the total's unit: "67.1/79.6 GiB"."""
    if used is None and total is None:
        return NA
    if total is None:
        return f"{format_bytes(used)}/{NA}"
    if used is None:
        return f"{NA}/{format_bytes(total)}"
    unit, scale = "B", 1.0
    for name, factor in (("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40)):
        if total >= factor:
            unit, scale = name, float(factor)
    if unit == "B":
        return f"{used:.0f}/{total:.0f} B"
    return f"{used / scale:.1f}/{total / scale:.1f} {unit}"


def format_rate_kb(value: int | None) -> str:
    """A PCIe throughput in KB/s, as NVML gives it: "310 MB/s"."""
    if value is None:
        return NA
    if value < 1024:
        return f"{value} KB/s"
    if value < 1024 * 1024:
        return f"{value / 1024:.0f} MB/s"
    return f"{value / (1024 * 1024):.1f} GB/s"


def format_percent(value: float | None) -> str:
    return NA if value is None else f"{value:.0f}%"


def format_duration(seconds: float | None) -> str:
    """3h 12m, 12d 3h, 45m, 30s."""
    if seconds is None:
        return NA
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def format_snapshot(
    snapshot: MonitorSnapshot, *, width: int | None = None, notice: bool = True
) -> str:
    """The ``oatui gpus`` table: header, GPUs, MIG devices, processes, then the host line.

    ``width`` (a terminal's columns) shortens long command lines to fit; ``notice`` False leaves
    the notice out (a stream that said it once already).
    """
    lines = [_header(snapshot)]
    if notice and snapshot.notice:
        lines.append(printable(snapshot.notice))
    if snapshot.gpus:
        lines.append("")
        lines.extend(_table(*_gpu_rows(snapshot.gpus)))
        mig_rows = _mig_rows(snapshot.gpus)
        if mig_rows[1]:
            lines.append("")
            lines.extend(_table(*mig_rows))
        lines.append("")
        process_table = _process_rows(snapshot.gpus)
        if process_table[1]:
            lines.extend(_table(*process_table, width=width))
        else:
            lines.append("No GPU processes.")
    lines.append("")
    lines.append(_host_line(snapshot.host))
    return "\n".join(lines)


def _header(snapshot: MonitorSnapshot) -> str:
    parts = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot.time))]
    if snapshot.host.hostname:
        parts.append(printable(snapshot.host.hostname))
    if snapshot.driver_version:
        parts.append(f"driver {printable(snapshot.driver_version)}")
    if snapshot.cuda_version:
        parts.append(f"CUDA {printable(snapshot.cuda_version)}")
    count = len(snapshot.gpus)
    parts.append(f"{count} GPU" + ("" if count == 1 else "s"))
    return "  ".join(parts)


def _gpu_rows(gpus: Sequence[GpuSnapshot]) -> tuple[list[str], list[list[str]], str]:
    headers = [
        "GPU",
        "NAME",
        "UTIL",
        "MEM-UTIL",
        "MEMORY",
        "MEM%",
        "TEMP",
        "POWER",
        "FAN",
        "SM MHZ",
        "MEM MHZ",
        "PCIE RX",
        "PCIE TX",
        "MIG",
        "PROCS",
    ]
    rows = []
    for gpu in gpus:
        if gpu.power_draw is None and gpu.power_limit is None:
            power = NA
        else:
            draw = NA if gpu.power_draw is None else f"{gpu.power_draw:.0f}"
            limit = NA if gpu.power_limit is None else f"{gpu.power_limit:.0f}"
            power = f"{draw}/{limit} W"
        rows.append(
            [
                str(gpu.index),
                printable(gpu.name),
                format_percent(gpu.utilization_gpu),
                format_percent(gpu.utilization_memory),
                format_used_total(gpu.memory_used, gpu.memory_total),
                format_percent(gpu.memory_percent),
                NA if gpu.temperature is None else f"{gpu.temperature:.0f}C",
                power,
                format_percent(gpu.fan),
                NA if gpu.clock_sm is None else str(gpu.clock_sm),
                NA if gpu.clock_mem is None else str(gpu.clock_mem),
                format_rate_kb(gpu.pcie_rx),
                format_rate_kb(gpu.pcie_tx),
                NA if gpu.mig_mode is None else ("on" if gpu.mig_mode else "off"),
                str(len(gpu.processes)),
            ]
        )
    return headers, rows, "rlrrrrrrrrrrrlr"


def _mig_rows(gpus: Sequence[GpuSnapshot]) -> tuple[list[str], list[list[str]], str]:
    headers = ["GPU", "MIG", "NAME", "GI", "CI", "MEMORY", "MEM%", "UTIL", "UUID"]
    rows = []
    for gpu in gpus:
        for mig in gpu.mig_devices:
            rows.append(
                [
                    str(gpu.index),
                    str(mig.index),
                    printable(mig.name),
                    NA if mig.gpu_instance_id is None else str(mig.gpu_instance_id),
                    NA if mig.compute_instance_id is None else str(mig.compute_instance_id),
                    format_used_total(mig.memory_used, mig.memory_total),
                    format_percent(mig.memory_percent),
                    format_percent(mig.utilization_gpu),
                    printable(mig.uuid),
                ]
            )
    return headers, rows, "rrlrrrrrl"


def _process_rows(gpus: Sequence[GpuSnapshot]) -> tuple[list[str], list[list[str]], str]:
    headers = ["GPU", "MIG", "PID", "TYPE", "USER", "GPU MEMORY", "COMMAND"]
    rows = []
    for gpu in gpus:
        for process in gpu.processes:
            rows.append(
                [
                    str(gpu.index),
                    "-" if process.mig_index is None else str(process.mig_index),
                    str(process.pid),
                    process.type,
                    printable(process.user),
                    format_bytes(process.gpu_memory),
                    printable(process.command),
                ]
            )
    return headers, rows, "rrrllrl"


def _host_line(host: HostSnapshot) -> str:
    cores = len(host.cpu_percent)
    parts = ["HOST"]
    if host.hostname:
        parts.append(printable(host.hostname))
    parts.append(
        f"cpu {format_percent(host.cpu_percent_mean)} of {cores} core{'' if cores == 1 else 's'}"
    )
    if host.load_average is not None:
        parts.append("load " + " ".join(f"{value:.2f}" for value in host.load_average))
    parts.append(f"mem {format_used_total(host.memory_used, host.memory_total)}")
    parts.append(f"swap {format_used_total(host.swap_used, host.swap_total)}")
    disk = f"disk {format_used_total(host.disk_used, host.disk_total)}"
    if host.disk_path:
        disk += f" ({printable(host.disk_path)})"
    parts.append(disk)
    parts.append(f"up {format_duration(host.uptime)}")
    return "  ".join(parts)


def printable(text: str | None) -> str:
    """A string from a recording or a process table, safe to print: no control characters."""
    if text is None:
        return NA
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _table(
    headers: list[str], rows: list[list[str]], align: str, width: int | None = None
) -> list[str]:
    """Columns padded to their widest cell; ``align`` holds "l" or "r" per column.

    With ``width``, the last column is shortened so that each line fits.
    """
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    if width is not None and rows:
        before_last = sum(widths[:-1]) + 2 * (len(widths) - 1)
        room = max(20, width - before_last)
        if widths[-1] > room:
            widths[-1] = room
            rows = [row[:-1] + [_shorten(row[-1], room)] for row in rows]

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(widths[i]) if align[i] == "r" else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(padded).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _shorten(text: str, room: int) -> str:
    return text if len(text) <= room else text[: room - 3] + "..."
