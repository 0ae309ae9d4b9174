"""Command-line names and output for people: `data stats --trees feedback` reads the workspace's
feedback file as configs do, and `serve --status` prints a table (`--json` keeps the record)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from helpers import run_oatui
from oatui.commands.serve import status_table
from oatui.data.sample import SAMPLE_FILE
from oatui.serve.record import ServerInfo


def test_data_stats_takes_feedback_as_a_name(workspace: Path) -> None:
    missing = run_oatui("data", "stats", "--trees", "feedback", workspace=workspace)
    assert missing.returncode == 2 and missing.stdout == ""
    [line] = missing.stderr.strip().splitlines()
    assert "--trees feedback" in line and "feedback.trees.jsonl" in line and "Traceback" not in line

    feedback = workspace / "data" / "feedback.trees.jsonl"
    feedback.parent.mkdir(mode=0o700)
    with gzip.open(SAMPLE_FILE, "rb") as sample:
        feedback.write_bytes(b"".join(sample.readlines()[:6]))
    by_name = run_oatui("data", "stats", "--trees", "feedback", "--json", workspace=workspace, check=True)
    by_path = run_oatui("data", "stats", "--trees", str(feedback), "--json", workspace=workspace, check=True)
    assert json.loads(by_name.stdout) == json.loads(by_path.stdout)
    assert json.loads(by_name.stdout)["trees_total"] == 6
    table = run_oatui("data", "stats", "--trees", "feedback", workspace=workspace, check=True)
    assert table.stdout.splitlines()[0].split() == ["trees_total", "6"]


def test_serve_status_is_a_table_and_json_on_request(workspace: Path) -> None:
    assert run_oatui("serve", "--status", workspace=workspace, check=True).stdout.strip() == "not running"
    assert json.loads(run_oatui("serve", "--status", "--json", workspace=workspace, check=True).stdout) is None
    alone = run_oatui("serve", "--json", workspace=workspace)
    assert alone.returncode == 2 and alone.stderr.strip().splitlines() == [alone.stderr.strip()]
    assert "--json" in alone.stderr


def test_the_status_table_names_each_fact() -> None:
    info = ServerInfo(pid=4242, supervisor_pid=4241, address="127.0.0.1", http_port=8000, grpc_port=8001,
                      metrics_port=8002, repo="/ws/triton", models=["policy", "rm"], log="/ws/logs/tritonserver.log",
                      started=1000.0, bundled=True, admin_key_file="/ws/state/triton-admin-key")
    table = status_table(info, now=1000.0 + 3725)
    rows = dict(line.split(None, 1) for line in table.splitlines())
    assert rows["server"] == "running, pid 4242, up 1h 2m"
    assert rows["gRPC"] == "127.0.0.1:8001" and rows["HTTP"] == "http://127.0.0.1:8000"
    assert rows["models"] == "policy, rm" and rows["repository"] == "/ws/triton"
    assert rows["address"] == "127.0.0.1"  # loopback: no key needed
    assert rows["log"] == "/ws/logs/tritonserver.log"
    exposed = status_table(ServerInfo(**{**info.__dict__, "address": "0.0.0.0"}), now=1000.0)
    assert "key in /ws/state/triton-admin-key" in exposed
    assert "{" not in table  # for people, not JSON
