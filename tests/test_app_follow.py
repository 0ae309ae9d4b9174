"""Following growing files: new bytes only, complete lines, truncation, the tail of a long log."""

from __future__ import annotations

import json
import os
from pathlib import Path

from oatui.app.follow import FileFollower, MetricsFollower
from oatui.app.widgets.run_log import clean_line


def test_reads_only_new_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    follower = FileFollower(path)
    assert follower.read_new() == []  # no file yet
    path.write_text("one\ntwo\nthr")
    assert follower.read_new() == ["one", "two"]
    assert follower.read_new() == []
    with open(path, "a") as handle:
        handle.write("ee\r\nfour\n")
    assert follower.read_new() == ["three", "four"]
    assert follower.offset == path.stat().st_size


def test_a_truncated_or_replaced_file_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    path.write_text("a\nb\n")
    follower = FileFollower(path)
    assert follower.read_new() == ["a", "b"]
    path.write_text("c\n")
    assert follower.read_new() == ["c"]
    replacement = tmp_path / "new.log"
    replacement.write_text("d\ne\nf\n")
    os.replace(replacement, path)
    assert follower.read_new() == ["d", "e", "f"]


def test_a_long_log_starts_near_its_end_and_reads_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    path.write_text("".join(f"line {i}\n" for i in range(100_000)))
    follower = FileFollower(path, start_tail_bytes=1000, max_read=500)
    first = follower.read_new()
    assert first[-1].startswith("line ") and int(first[-1].split()[1]) < 99_999  # bounded: not at the end yet
    rest = []
    while lines := follower.read_new():
        rest.extend(lines)
    assert (first + rest)[-1] == "line 99999"
    assert int(first[0].split()[1]) > 99_000  # a cut first line is dropped, older ones never read


def test_metrics_follower_skips_torn_and_foreign_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\nnot json\n[1]\n" + '{"step": 2')
    follower = MetricsFollower(path)
    assert follower.read_new() == [{"step": 1, "train/loss": 2.0}]
    with open(path, "a") as handle:
        handle.write(', "train/loss": 1.5}\n')
    assert follower.read_new() == [{"step": 2, "train/loss": 1.5}]


def test_log_lines_are_cleaned_like_a_terminal_shows_them() -> None:
    assert clean_line("\x1b[32mok\x1b[0m") == "ok"
    assert clean_line("10%|#  |\r50%|### |") == "50%|### |"
    assert clean_line("a\tb\x07") == "a   b"
