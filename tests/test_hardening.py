"""Bad input and attacks done for real: corrupted files of every kind the product reads back, YAML
bombs, foreign and loose workspaces, an exposed server's APIs without the key, a planted pickle on
resume. Each ends with exit status 2 and one line on stderr (or a refused request), in seconds."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import OATUI
from oatui.cli import main
from oatui.netutil import free_ports

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    """Run ``oatui argv`` in this process: exit 2 and exactly one line on stderr holding ``expected``."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def sample_lines(count: int = 6) -> bytes:
    sample = Path(__file__).resolve().parent.parent / "oatui" / "data" / "sample" / "oasst_sample.trees.jsonl.gz"
    with gzip.open(sample, "rb") as handle:
        return b"".join(handle.readline() for _ in range(count))


# ---------------------------------------------------------------------------------------------
# Files read line by line: plain and gzip, corrupted anywhere, long lines, special files


@FUZZ
@given(position=st.floats(0, 1), junk=st.binary(min_size=1, max_size=8), gzipped=st.booleans(), cut=st.booleans())
def test_corrupted_export_files_are_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              position: float, junk: bytes, gzipped: bool,
                                                              cut: bool) -> None:
    data = gzip.compress(sample_lines()) if gzipped else sample_lines()
    # Past the gzip header too: the body is where zlib fails.
    at = int(position * (len(data) - 1))
    broken = data[:at] + junk + (b"" if cut else data[at + len(junk):])
    path = tmp_path / ("trees.jsonl.gz" if gzipped else "trees.jsonl")
    path.write_bytes(broken)
    code = main(["data", "stats", "--trees", str(path), "--workspace", str(tmp_path / "ws")])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1 and str(path) in err
    assert path.read_bytes() == broken


def test_bad_bytes_are_reported_on_their_own_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = sample_lines(6).splitlines(keepends=True)
    lines[5] = lines[5][:40] + b"\xff\xfe" + lines[5][40:]
    path = tmp_path / "trees.jsonl"
    path.write_bytes(b"".join(lines))
    one_line(capsys, ["data", "stats", "--trees", str(path), "--workspace", str(tmp_path / "ws")],
             f"{path}:6: not UTF-8")


def test_special_files_and_endless_lines_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import oatui.fsutil

    one_line(capsys, ["data", "stats", "--trees", "/dev/zero", "--workspace", str(tmp_path / "ws")],
             "/dev/zero: not a regular file")
    monkeypatch.setattr(oatui.fsutil.iter_text_lines, "__defaults__", (1 << 16,))
    long = tmp_path / "long.jsonl"
    long.write_bytes(b"{" + b" " * (1 << 17))
    one_line(capsys, ["data", "stats", "--trees", str(long), "--workspace", str(tmp_path / "ws")],
             f"{long}:1: line longer than")


@FUZZ
@given(text=st.binary(max_size=40))
def test_any_hostfile_is_accepted_or_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: bytes) -> None:
    from oatui.errors import UserError
    from oatui.stages.launcher import _hosts

    hostfile = tmp_path / "hosts"
    hostfile.write_bytes(text)
    try:
        _hosts(str(hostfile))
    except UserError as error:
        assert "\n" not in str(error) and "hosts" in str(error)


# ---------------------------------------------------------------------------------------------
# YAML: deep nesting and alias bombs, in config files and --set


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 5000), opener=st.sampled_from(["[", "{a: ", "- "]), where=st.sampled_from(["file", "set"]))
def test_deep_yaml_is_one_line_in_a_file_or_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int,
                                                opener: str, where: str) -> None:
    from oatui.config import load_stage_config
    from oatui.errors import UserError

    value = opener * depth if opener != "- " else "".join("  " * i + "- " for i in range(depth)) + "x"
    overrides = []
    if where == "file":
        folder = tmp_path / "configs"
        folder.mkdir(exist_ok=True)
        (folder / "deep.yaml").write_text(f"deep:\n  seed: {value}\n" if opener != "- " else f"deep:\n  seed:\n{value}\n")
        monkeypatch.setenv("OATUI_CONFIG_PATH", str(folder))
    else:
        overrides = [f"seed={value}"]
    try:
        load_stage_config("sft", ["defaults", "tiny"], overrides)
    except UserError as error:
        assert "\n" not in str(error)


def test_a_yaml_alias_bomb_in_a_workspace_config_is_one_line_at_once(workspace: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (workspace / "configs").mkdir(mode=0o700)
    (workspace / "configs" / "bomb.yaml").write_text(BOMB)
    assert len(BOMB) < 700
    one_line(capsys, ["train", "sft", "--configs", "defaults", "tiny", "--print-config", "--workspace", str(workspace)],
             "bomb.yaml", "aliases are expanded")
    (workspace / "configs" / "bomb.yaml").unlink()
    one_line(capsys, ["train", "sft", "--configs", "defaults", "tiny", "--print-config", "--workspace", str(workspace),
                      "--set", "seed=" + "[" * 5000], "seed")


@pytest.mark.parametrize("option, expected", [
    ("tiny_model={bogus: 1}", "unknown shape key 'bogus'"),
    ("deepspeed=/etc/passwd", "not a DeepSpeed JSON config"),
    ("max_length=1000000000000", "max_length: must be"),
])
def test_bad_set_values_are_refused_before_a_run_folder_exists(workspace: Path, capsys: pytest.CaptureFixture[str],
                                                                option: str, expected: str) -> None:
    one_line(capsys, ["train", "sft", "--configs", "defaults", "tiny", "--set", option, "--workspace", str(workspace)],
             expected)
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())


# ---------------------------------------------------------------------------------------------
# State files read back: run.json, server.json, chats.sqlite, checkpoints' JSON


SERVER_JSON = {"pid": 1, "supervisor_pid": None, "address": "127.0.0.1", "http_port": 8000, "grpc_port": 8001,
               "metrics_port": 8002, "repo": "/r", "models": ["policy"], "log": "/l", "started": 1.0}
JSON_VALUES = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=4), st.booleans(),
                        st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


@FUZZ
@given(raw=st.one_of(
    st.binary(max_size=40),
    st.builds(lambda k, v: json.dumps({**SERVER_JSON, k: v}).encode(), st.sampled_from(sorted(SERVER_JSON)), JSON_VALUES),
    st.builds(lambda n: json.dumps(SERVER_JSON).encode()[:n], st.integers(0, 150)),
    st.just(b"[" * 100000),
))
def test_a_corrupted_server_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes) -> None:
    workspace = tmp_path / "ws"
    (workspace / "state").mkdir(parents=True, exist_ok=True, mode=0o700)
    (workspace / "state" / "server.json").write_bytes(raw)
    for argv in (["serve", "--status"], ["serve", "--stop"], ["chat", "hi", "--timeout", "1"]):
        code = main([*argv, "--workspace", str(workspace)])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert code == 0 or (code == 2 and err.count("\n") == 1), (argv, code, err)
        if code == 2 and argv[0] == "serve":
            assert "server.json" in err
        (workspace / "state" / "server.json").write_bytes(raw)  # --stop may have cleaned a stale record


RUN_JSON = {"id": "sft-20260101-000000-abcd", "stage": "sft", "state": "failed", "argv": ["python"], "pid": 1,
            "created": 1.0, "started": 1.0, "ended": 2.0, "exit_code": 1, "launcher": "python", "gpus": None,
            "num_processes": 1, "hostfile": None, "configs": ["defaults"], "overrides": [], "resumes": 0,
            "workspace": None, "host": "h", "error": None, "signal": None, "stop_requested": False}


@FUZZ
@given(key=st.sampled_from(sorted(RUN_JSON)), value=JSON_VALUES, command=st.sampled_from(["resume", "tail", "show"]))
def test_every_run_json_key_of_the_wrong_type_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          key: str, value: object, command: str) -> None:
    workspace = tmp_path / "ws"
    run = workspace / "runs" / RUN_JSON["id"]
    run.mkdir(parents=True, exist_ok=True, mode=0o700)
    (run / "run.json").write_text(json.dumps({**RUN_JSON, key: value}))
    (run / "config.yaml").write_text("max_steps: 1\n")
    (run / "stdout.log").write_text("")
    before = (run / "run.json").read_bytes()
    argv = {"resume": ["train", "sft", "--resume", RUN_JSON["id"], "--num-processes", "-1"],
            "tail": ["runs", "tail", "-f", RUN_JSON["id"]],
            "show": ["runs", "show", RUN_JSON["id"]]}[command]
    code = main([*argv, "--workspace", str(workspace)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 0 or (code == 2 and err.count("\n") == 1), (code, err)
    if command == "resume":
        assert code == 2 and (run / "run.json").read_bytes() == before


_CHATS: dict[str, bytes] = {}


def _chat_store_bytes(tmp_path: Path) -> bytes:
    """A real chat history with two conversations, made once."""
    if "db" not in _CHATS:
        from oatui.chat.history import ChatHistory

        history = ChatHistory(tmp_path / "seed.sqlite")
        for title in ("bread", "tea"):
            conversation = history.new_conversation(title, model="policy", params={"temperature": 0.7})
            first = history.add_message(conversation.id, "prompter", f"How do I make {title}?")
            history.add_message(conversation.id, "assistant", "Like this.", parent_id=first.id, model="policy")
        _CHATS["db"] = (tmp_path / "seed.sqlite").read_bytes()
    return _CHATS["db"]


@FUZZ
@given(position=st.floats(0, 1), junk=st.binary(min_size=1, max_size=16), cut=st.booleans())
def test_a_corrupted_chat_history_is_one_line_or_works(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        position: float, junk: bytes, cut: bool) -> None:
    data = _chat_store_bytes(tmp_path)
    at = int(position * (len(data) - 1))
    workspace = tmp_path / "ws"
    (workspace / "state").mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in ("chats.sqlite-wal", "chats.sqlite-shm"):
        (workspace / "state" / name).unlink(missing_ok=True)
    (workspace / "state" / "chats.sqlite").write_bytes(data[:at] + junk + (b"" if cut else data[at + len(junk):]))
    out = tmp_path / "chats.jsonl"
    code = main(["chat", "export", "--out", str(out), "--workspace", str(workspace)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 0 or (code == 2 and err.count("\n") == 1 and "chats.sqlite" in err), (code, err)


@FUZZ
@given(name=st.sampled_from(["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]),
       raw=st.one_of(st.binary(max_size=30), st.builds(lambda v: json.dumps(v).encode(), JSON_VALUES),
                     st.just(b"[" * 50000)))
def test_any_checkpoint_json_file_is_an_object_or_one_line(tmp_path: Path, name: str, raw: bytes) -> None:
    from oatui.errors import UserError
    from oatui.models.loading import check_checkpoint_files

    import tempfile

    model = Path(tempfile.mkdtemp(dir=tmp_path))
    (model / name).write_bytes(raw)
    try:
        check_checkpoint_files(str(model))
    except UserError as error:
        assert "\n" not in str(error) and name in str(error)
    else:
        assert isinstance(json.loads(raw), dict)


def test_a_run_id_or_model_name_with_a_newline_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from oatui.serve.repository import NAME_PATTERN
    from oatui.stages.rundir import valid_run_id

    assert not valid_run_id("sft-1\n") and valid_run_id("sft-1")
    assert not NAME_PATTERN.match("pol\n") and NAME_PATTERN.match("pol")


@pytest.mark.parametrize("content, expected", [
    (b"[]", "config.json: expected an object"),
    (b"{\"model_type\": ", "config.json:1: not valid JSON"),
    (b"\xff\xfe", "config.json:1: not UTF-8"),
])
def test_a_checkpoint_with_broken_json_is_one_line_on_export(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              content: bytes, expected: str) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(content)
    (model / "tokenizer.json").write_text("{}")
    one_line(capsys, ["export", "--mode", "policy", "--model", str(model), "--workspace", str(tmp_path / "ws")],
             expected)


def test_a_tokenizer_of_the_wrong_schema_is_one_line(tmp_path: Path) -> None:
    from oatui.errors import UserError
    from oatui.models.loading import load_tokenizer

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    (model / "tokenizer.json").write_text(json.dumps({"model": {"type": "nonsense"}, "version": 3}))
    with pytest.raises(UserError) as caught:
        load_tokenizer(str(model))
    assert "\n" not in str(caught.value) and str(model) in str(caught.value)
    (model / "tokenizer.json").write_text("[]")
    with pytest.raises(UserError, match="tokenizer.json: expected an object"):
        load_tokenizer(str(model))


def test_export_repo_that_is_a_file_and_chat_export_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workspace = tmp_path / "ws"
    afile = tmp_path / "afile"
    afile.write_text("keep")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    one_line(capsys, ["export", "--mode", "policy", "--model", str(model), "--repo", str(afile),
                      "--workspace", str(workspace)], f"--repo {afile}: not a folder")
    one_line(capsys, ["chat", "export", "--out", str(tmp_path / "missing" / "x.jsonl"), "--workspace", str(workspace)],
             "no folder")
    one_line(capsys, ["chat", "export", "--out", str(tmp_path), "--workspace", str(workspace)], "is a folder")
    (workspace / "state" / "chats.sqlite").write_bytes(b"not a database at all" * 50)
    one_line(capsys, ["chat", "export", "--out", str(tmp_path / "x.jsonl"), "--workspace", str(workspace)],
             "chats.sqlite: not a chat history")
    assert afile.read_text() == "keep"


def test_options_out_of_range_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workspace = str(tmp_path / "ws")
    for value in ("nan", "inf", "-1"):
        one_line(capsys, ["serve", "--ready-timeout", value, "--workspace", workspace], "--ready-timeout")
    one_line(capsys, ["chat", "hi", "--url", "127.0.0.1:99999", "--workspace", workspace], "port 99999 is out of range")
    one_line(capsys, ["runs", "--workspace", ""], "--workspace: empty")
    one_line(capsys, ["runs", "--workspace", "~no-such-user-here/ws"], "no such user's home folder")
    one_line(capsys, ["train", "sft", "--configs", "defaults", "tiny", "--set", "deepspeed=~0", "--workspace", workspace],
             "deepspeed")
    code = main(["serve", "--address", "not_a_host", "--repo", str(tmp_path), "--workspace", workspace])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "reachable" not in err


# ---------------------------------------------------------------------------------------------
# Workspaces: foreign-owned, loose modes, read-only; shadowed sections


NOBODY = 65534


def test_a_foreign_or_loose_workspace_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    every = (["runs"], ["runs", "stop", "x"], ["export", "--mode", "policy", "--model", "x"], ["serve", "--status"],
             ["serve", "--stop"], ["chat", "export"], ["chat", "hi"], ["train", "sft", "--configs", "defaults", "tiny"],
             ["train", "rl", "--resume", "x"], ["train", "sft", "--list-keys"], ["demo"])
    for command in every:
        one_line(capsys, [*command, "--workspace", str(loose)], f"--workspace {loose}: refusing", "writable by")
    os.chmod(loose, 0o770)
    one_line(capsys, ["runs", "--workspace", str(loose)], "writable by its group")
    os.chmod(loose, 0o700)
    (loose / "configs").mkdir(mode=0o700)
    (loose / "configs" / "mine.yaml").write_text("tiny:\n  trust_remote_code: true\n")
    os.chmod(loose / "configs" / "mine.yaml", 0o666)
    one_line(capsys, ["train", "sft", "--configs", "defaults", "tiny", "--print-config", "--workspace", str(loose)],
             "mine.yaml: refusing config files", "writable by")
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, NOBODY, NOBODY)
    one_line(capsys, ["runs", "--workspace", str(foreign)], "owned by nobody, not by you")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="runs oatui as nobody via setpriv")
def test_as_an_unprivileged_user_foreign_and_read_only_workspaces_are_one_line(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="oatui-nobody-", dir="/tmp"))  # pytest's base is 0700: nobody cannot reach it
    os.chmod(tmp_path, 0o755)
    mine = tmp_path / "mine"  # root's: foreign to nobody
    mine.mkdir(mode=0o700)
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o500)
    os.chown(readonly, NOBODY, NOBODY)
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", OATUI]
    for workspace, expected in ((mine, "owned by root"), (readonly, "not writable by you")):
        for command in (["runs"], ["serve", "--status"], ["chat", "export"], ["train", "sft", "--configs", "defaults", "tiny"],
                        ["export", "--mode", "policy", "--model", "x"]):
            result = subprocess.run([*as_nobody, *command, "--workspace", str(workspace)], capture_output=True,
                                    text=True, timeout=60, env=env, cwd=tmp_path)
            assert result.returncode == 2 and result.stderr.count("\n") == 1, (command, result.stderr)
            assert expected in result.stderr and "Traceback" not in result.stderr
    os.chmod(readonly, 0o700)
    shutil.rmtree(tmp_path)


def test_a_workspace_section_that_replaces_a_shipped_one_is_said(workspace: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (workspace / "configs").mkdir(mode=0o700)
    (workspace / "configs" / "mine.yaml").write_text("tiny:\n  seed: 7\n")
    assert main(["train", "sft", "--configs", "defaults", "tiny", "--print-config", "--workspace", str(workspace)]) == 0
    err = capsys.readouterr().err
    assert "note: section 'tiny' from" in err and "mine.yaml:1 replaces the one in" in err


# ---------------------------------------------------------------------------------------------
# Security: an exposed server's APIs without the key; a planted pickle on resume


def _request(url: str, method: str = "GET", body: bytes | None = None, key: str | None = None) -> int:
    request = urllib.request.Request(url, method=method, data=body)
    if key:
        request.add_header("admin-key", key)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our own server
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_an_exposed_server_answers_only_health_metadata_and_inference_without_the_key(tmp_path: Path) -> None:
    """tritonserver on 0.0.0.0 with oatui's command line: every other API group is refused (403)."""
    from oatui.serve.binary import find_server, prepare_bundled_backends, server_argv, server_environment
    from oatui.serve.ports import ADMIN_HEADER, GRPC_HEADER_PREFIX
    from oatui.serve.readiness import wait_ready
    from oatui.serve.record import ServerOptions
    from oatui.workspace import Workspace

    workspace = Workspace.open(tmp_path / "ws")
    repo = tmp_path / "repo"
    repo.mkdir()
    http, grpc, metrics = free_ports(3)
    options = ServerOptions(repo=str(repo), http_port=http, grpc_port=grpc, metrics_port=metrics,
                            address="0.0.0.0")
    command = find_server(None)
    backends = prepare_bundled_backends(workspace) if command.bundled else None
    argv = server_argv(command, options, backends, "k3y-for-tests")
    process = subprocess.Popen(argv, env=server_environment(command.bundled, None), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{http}"
        assert wait_ready(base, (), 60, lambda: process.poll() is None)
        open_apis = [("GET", "/v2/health/ready", None), ("GET", "/v2", None)]
        for method, path, body in open_apis:
            assert _request(base + path, method, body) == 200, path
        # Inference and model metadata are open: an unknown model is a 404, not a 403.
        assert _request(base + "/v2/models/nope", "GET") == 404
        assert _request(base + "/v2/models/nope/infer", "POST", b"{}") == 404
        restricted = [("POST", "/v2/logging", b'{"log_verbose_level": 1}'), ("GET", "/v2/logging", None),
                      ("GET", "/v2/models/nope/config", None), ("GET", "/v2/models/stats", None),
                      ("GET", "/v2/trace/setting", None), ("POST", "/v2/trace/setting", b'{"trace_rate": "1"}'),
                      ("POST", "/v2/repository/index", b"{}"), ("GET", "/v2/systemsharedmemory/status", None),
                      ("GET", "/v2/cudasharedmemory/status", None)]
        for method, path, body in restricted:
            assert _request(base + path, method, body) == 403, path
            assert _request(base + path, method, body, key="wrong") == 403, path
        assert _request(base + "/v2/logging", "GET", key="k3y-for-tests") == 200
        assert _request(base + "/v2/models/stats", "GET", key="k3y-for-tests") == 200
        # gRPC: the same groups, with tritonserver's header prefix.
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        assert client.is_server_ready()
        with pytest.raises(InferenceServerException):
            client.get_log_settings()
        with pytest.raises(InferenceServerException):
            client.get_model_repository_index()
        header = {f"{GRPC_HEADER_PREFIX}{ADMIN_HEADER}": "k3y-for-tests"}
        assert client.get_model_repository_index(headers=header) is not None
        client.close()
        # oatui's clients: without the key a model's config is refused and the chat client falls back
        # to the default EOS (no retries, no hang); with $OATUI_ADMIN_KEY the request gets through.
        from oatui.serve.client import ADMIN_KEY_ENV, ChatClient, ServerUnavailable

        os.environ.pop(ADMIN_KEY_ENV, None)
        with ChatClient(f"127.0.0.1:{grpc}", model="nope", retries=3) as chat:
            assert chat.eos_token() == "<|endoftext|>"
        os.environ[ADMIN_KEY_ENV] = "k3y-for-tests"
        try:
            with ChatClient(f"127.0.0.1:{grpc}", model="nope", retries=0) as chat, \
                    pytest.raises(ServerUnavailable, match="model not available"):
                chat.eos_token()
        finally:
            del os.environ[ADMIN_KEY_ENV]
    finally:
        process.terminate()
        process.wait(timeout=30)


class _Exploit:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {os.environ['OATUI_PWNED']}",))


def test_a_planted_pickle_in_a_checkpoint_is_refused_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import pickle

    marker = tmp_path / "pwned"
    monkeypatch.setenv("OATUI_PWNED", str(marker))
    workspace = tmp_path / "ws"
    run = workspace / "runs" / "rl-20260101-000000-abcd"
    checkpoint = run / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True, mode=0o700)
    info = {**RUN_JSON, "id": run.name, "stage": "rl", "state": "stopped", "exit_code": 75}
    (run / "run.json").write_text(json.dumps(info))
    (run / "config.yaml").write_text("total_steps: 4\n")
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (checkpoint / name).write_bytes(pickle.dumps(_Exploit()))
    before = (run / "run.json").read_bytes()
    one_line(capsys, ["train", "rl", "--resume", run.name, "--workspace", str(workspace)],
             "custom_checkpoint_0.pkl: refusing a checkpoint that holds a pickle")
    assert (run / "run.json").read_bytes() == before and not marker.exists()

    # The stage itself refuses too (a run started by hand, or a file planted after the check).
    from accelerate import Accelerator

    from oatui.train.ppo.checkpoint import CheckpointRefused, load_checkpoint

    with pytest.raises(CheckpointRefused, match="custom_checkpoint_0.pkl: refusing"):
        load_checkpoint(Accelerator(cpu=True), checkpoint, {})
    assert not marker.exists()


def test_rl_checkpoint_state_is_json_and_round_trips(tmp_path: Path) -> None:
    """save_checkpoint keeps the scheduler, controllers and RNG states as JSON, no pickle in the
    folder; load_checkpoint restores them (the stop/resume test in test_ppo_stage checks whole runs)."""
    import random

    import numpy as np
    import torch
    from accelerate import Accelerator
    from transformers import get_scheduler

    from oatui.stages.rundir import pickled_files
    from oatui.train.ppo.checkpoint import Progress, load_checkpoint, save_checkpoint
    from oatui.train.ppo.kl_control import AdaptiveKLController

    def build() -> tuple:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, optimizer)
        return accelerator, model, optimizer, scheduler

    accelerator, model, optimizer, scheduler = build()
    for _ in range(3):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    controller, progress = AdaptiveKLController(0.05, 6.0, 100), Progress()
    controller.update(9.0, 16)
    progress.step, progress.prompts_consumed = 3, 48
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    state = {"scheduler": scheduler, "kl_controller": controller, "progress": progress}
    path = save_checkpoint(accelerator, tmp_path / "checkpoints", 3, 2, state)
    assert not pickled_files(path)
    assert json.loads((path / "training_state.json").read_text())["progress"] == {"step": 3, "prompts_consumed": 48}
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    accelerator2, model2, optimizer2, scheduler2 = build()
    controller2, progress2 = AdaptiveKLController(0.05, 6.0, 100), Progress()
    load_checkpoint(accelerator2, path, {"scheduler": scheduler2, "kl_controller": controller2, "progress": progress2})
    assert (progress2.step, progress2.prompts_consumed) == (3, 48)
    assert controller2.value == controller.value and scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected

    (path / "training_state.json").write_text("[1]")
    from oatui.train.ppo.checkpoint import CheckpointRefused

    with pytest.raises(CheckpointRefused, match="training_state.json: expected an object"):
        load_checkpoint(accelerator2, path, {"progress": progress2})


def test_torch_files_that_name_other_globals_are_refused_before_loading(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed loads its checkpoint files with weights_only=False: the stage lists each torch
    file's globals (without running anything) and refuses any beyond tensors, numpy's RNG state and
    DeepSpeed's own state classes."""
    import random

    import numpy as np
    import torch

    from oatui.errors import UserError
    from oatui.train.common import check_torch_files

    marker = tmp_path / "pwned"
    monkeypatch.setenv("OATUI_PWNED", str(marker))
    checkpoint = tmp_path / "checkpoint-4"
    (checkpoint / "global_step4").mkdir(parents=True)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
               checkpoint / "rng_state.pth")
    torch.save({"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
               checkpoint / "optimizer.pt")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    # DeepSpeed's own state objects pass; a DeepSpeed function (its launcher's main) does not.
    torch.save({"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0)},
               checkpoint / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_torch_files(checkpoint)
    import deepspeed.launcher.runner

    torch.save({"x": deepspeed.launcher.runner.main}, checkpoint / "global_step4" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UserError, match="it names deepspeed.launcher.runner.main"):
        check_torch_files(checkpoint)
    (checkpoint / "global_step4" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    torch.save({"module": _Exploit()}, checkpoint / "global_step4" / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="mp_rank_00_model_states.pt: refusing to resume: it names posix.system"):
        check_torch_files(checkpoint)
    (checkpoint / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x04not a zip")
    with pytest.raises(UserError, match="not a torch checkpoint file"):
        check_torch_files(checkpoint)
    assert not marker.exists()


def test_brackets_inside_json_strings_are_not_nesting(tmp_path: Path) -> None:
    from oatui.fsutil import UnreadableFile, read_json_file

    path = tmp_path / "state.json"
    path.write_text(json.dumps({"error": "[" * 500 + "unclosed", "argv": ["\\\"[[["]}))
    assert read_json_file(path)["error"].startswith("[[[")
    path.write_text("[" * 101 + "]" * 101)
    with pytest.raises(UnreadableFile, match="nested deeper than 100"):
        read_json_file(path, list)
