"""Serving pieces that need no real server: addresses, sampling checks, decoding, argv, logs, export files."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import OATUI, run_oatui, untrained_tiny_lm
from oatui.errors import UserError
from oatui.netutil import free_ports
from oatui.serve.client import AddressError, TritonAddress, classify, RemoteError, ServerUnavailable
from oatui.serve.generation import SamplingParams
from oatui.serve.binary import ServerCommand, redact, repository_view, server_argv, server_environment
from oatui.serve.ports import (
    DEFAULT_HTTP_PORT,
    PORT_FIELDS,
    check_port_free,
    check_ports,
    connect_host,
    free_ports_if_taken,
    is_loopback,
    resolve_admin_key,
)
from oatui.serve.readiness import log_excerpt, wait_ready
from oatui.serve.record import ServerOptions
from oatui.serve.server import NothingToServe, repository_options
from oatui.workspace import Workspace


# ---------------------------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(
    ("text", "host", "port", "model"),
    [
        ("localhost:8001/rm", "localhost", 8001, "rm"),
        ("10.0.0.5:9001/ref-model", "10.0.0.5", 9001, "ref-model"),
        ("grpc://host:8001/policy/", "host", 8001, "policy"),
        ("[::1]:8001/rm", "[::1]", 8001, "rm"),
    ],
)
def test_triton_address_parses_the_open_assistant_form(text: str, host: str, port: int, model: str) -> None:
    address = TritonAddress.parse(text)
    assert (address.host, address.port, address.model) == (host, port, model)
    assert address.url == f"{host}:{port}"
    assert str(address) == f"{host}:{port}/{model}"


def test_triton_address_needs_a_model_unless_given_a_default() -> None:
    with pytest.raises(AddressError, match="no model name"):
        TritonAddress.parse("localhost:8001")
    assert TritonAddress.parse("localhost:8001", default_model="rm").model == "rm"
    assert TritonAddress.parse("localhost:8001/", default_model="rm").model == "rm"
    for bad in ("localhost/rm", "localhost:port/rm", "localhost:70000/rm", ":8001/rm", "h:1/a/b"):
        with pytest.raises(AddressError):
            TritonAddress.parse(bad)
    # One line, exit 2 from the command line: an AddressError is a UserError.
    assert issubclass(AddressError, UserError) and issubclass(AddressError, ValueError)


def test_errors_are_classified_by_grpc_status() -> None:
    from tritonclient.utils import InferenceServerException

    unavailable = classify(InferenceServerException("refused", status="StatusCode.UNAVAILABLE"), "h:1/m")
    assert isinstance(unavailable, ServerUnavailable) and "h:1/m" in str(unavailable)
    late = classify(InferenceServerException("late", status="StatusCode.DEADLINE_EXCEEDED"), "h:1/m", 3)
    assert isinstance(late, ServerUnavailable) and "3 s" in str(late)
    missing = classify(InferenceServerException("Request for unknown model: 'x' is not found",
                                                status="StatusCode.NOT_FOUND"), "h:1/x")
    assert isinstance(missing, ServerUnavailable)
    bad = classify(InferenceServerException("input 'text' is empty"), "h:1/m")
    assert isinstance(bad, RemoteError) and "input 'text' is empty" in str(bad)


# ---------------------------------------------------------------------------------------------
# Sampling parameters


def test_sampling_parameters_are_checked_by_name() -> None:
    params = SamplingParams.from_mapping({"max_new_tokens": 5, "temperature": 0, "top_p": 0.9, "top_k": 3, "seed": 1,
                                          "repetition_penalty": 1.2, "ignore_eos": True})
    assert params.temperature == 0.0 and isinstance(params.temperature, float) and params.top_k == 3
    for bad, needle in [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"temperature": float("nan")}, "finite"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"max_tokens": 3}, "unknown parameter 'max_tokens'"),
    ]:
        with pytest.raises(ValueError, match=needle):
            SamplingParams.from_mapping(bad)
    from oatui.serve.generation import parse_request_parameters

    params, interval = parse_request_parameters({"seed": 3, "stream_interval_ms": 0})
    assert params.seed == 3 and interval == 0.0
    assert parse_request_parameters({})[1] is None  # the default: 10 ms, spaced by the batch's size
    with pytest.raises(ValueError, match="stream_interval_ms"):
        parse_request_parameters({"stream_interval_ms": "soon"})


def test_round_trips_are_spaced_by_the_batch_size() -> None:
    from oatui.serve.generation import ROUND_TRIPS_PER_SECOND, spacing

    assert spacing(0.010, 1) == spacing(0.010, 2) == 0.010
    assert spacing(0.010, 8) == pytest.approx(0.040)
    assert 16 / spacing(0.010, 16) == pytest.approx(ROUND_TRIPS_PER_SECOND)  # the budget holds at any size
    assert spacing(0.5, 8) == 0.5  # a longer interval asked for stays


def test_throttled_check_asks_at_most_once_per_interval() -> None:
    from oatui.serve.generation import ThrottledCheck

    answers = iter([False, False, True])
    calls = []

    def check() -> bool:
        calls.append(time.perf_counter())
        return next(answers)

    throttled = ThrottledCheck(check, 0.05)
    assert throttled() is False and len(calls) == 1  # the first call always asks
    assert all(throttled() is False for _ in range(100)) and len(calls) == 1
    time.sleep(0.06)
    assert throttled() is False and len(calls) == 2
    time.sleep(0.06)
    assert throttled() is True and throttled() is True and len(calls) == 3  # a yes is kept


# ---------------------------------------------------------------------------------------------
# Generation pieces on a real (untrained) tiny model


@pytest.fixture(scope="module")
def tiny_lm():
    return untrained_tiny_lm(64)


def test_incremental_decoder_never_splits_a_character(tiny_lm) -> None:  # noqa: ANN001
    from oatui.serve.generation import IncrementalDecoder

    _, tokenizer = tiny_lm
    text = "Grüße aus Köln! 你好, мир 🙂🙂 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Byte-level BPE on a tokenizer trained on little data: multi-byte characters span tokens.
    assert len(ids) > len(text) // 2
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 5


def test_decode_loop_matches_full_forward_greedy(tiny_lm) -> None:  # noqa: ANN001
    """The KV-cache loop picks the same greedy tokens as recomputing the whole sequence."""
    import torch

    from oatui.serve.generation import generate_ids

    model, tokenizer = tiny_lm
    prompt = tokenizer("<|prompter|>hello there<|endoftext|><|assistant|>", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    got = list(generate_ids(model, prompt, params, {tokenizer.eos_token_id}, len(tokenizer), 64))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, : len(tokenizer)]
            ids.append(int(torch.argmax(logits)))
    assert got == ids[len(prompt):]
    # The context limit ends generation: 64 positions in all.
    long = list(generate_ids(model, prompt, SamplingParams(max_new_tokens=500, ignore_eos=True),
                             set(), len(tokenizer), 64))
    assert len(long) == 64 - len(prompt)
    # A cancellation check before each step.
    calls = []
    stopped = list(generate_ids(model, prompt, SamplingParams(max_new_tokens=50, ignore_eos=True), set(),
                                len(tokenizer), 64, should_stop=lambda: calls.append(1) or len(calls) > 3))
    assert len(stopped) == 3


def test_sampling_is_seeded_and_respects_top_k(tiny_lm) -> None:  # noqa: ANN001
    from oatui.serve.generation import generate_ids

    model, tokenizer = tiny_lm
    prompt = tokenizer("<|prompter|>hi<|endoftext|><|assistant|>", add_special_tokens=False)["input_ids"]

    def run(**kw):  # noqa: ANN003, ANN202
        params = SamplingParams(max_new_tokens=20, ignore_eos=True, **kw)
        return list(generate_ids(model, prompt, params, set(), len(tokenizer), 64))

    assert run(seed=7, temperature=1.0) == run(seed=7, temperature=1.0)
    assert run(seed=7, top_k=1) == run(temperature=0)  # top-1 sampling is greedy
    assert run(seed=3, top_p=1e-6) == run(temperature=0)
    assert all(t < len(tokenizer) for t in run(seed=5, repetition_penalty=1.3))


# ---------------------------------------------------------------------------------------------
# The server command line, environment, admin key and logs


def test_server_argv_for_the_bundled_server(tmp_path: Path) -> None:
    options = ServerOptions(repo=str(tmp_path / "repo"), http_port=9000, grpc_port=9001, metrics_port=9002,
                            models=("policy", "rm"))
    (tmp_path / "repo" / "policy").mkdir(parents=True)
    (tmp_path / "repo" / "rm").mkdir()
    (tmp_path / "repo" / "ref").mkdir()
    workspace = Workspace.open(tmp_path / "ws")
    view = repository_view(workspace, tmp_path / "repo", options.models)
    assert sorted(p.name for p in view.iterdir()) == ["policy", "rm"]
    assert (view / "policy").resolve() == (tmp_path / "repo" / "policy").resolve()
    argv = server_argv(ServerCommand(["/x/tritonserver"], True), options, tmp_path / "backends", None, view)
    assert argv[0] == "/x/tritonserver"
    for flag in ("--disable-auto-complete-config", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                 "--metrics-address=127.0.0.1", "--grpc-port=9001", f"--backend-directory={tmp_path / 'backends'}",
                 "--model-control-mode=none", f"--model-repository={view}"):
        assert flag in argv
    assert not any(arg.startswith("--load-model") for arg in argv)
    assert not any("restricted" in arg for arg in argv)
    everything = server_argv(ServerCommand(["apptainer", "exec", "--nv", "t.sif", "tritonserver"], False),
                             ServerOptions(repo="/r", address="0.0.0.0"), None, "s3cret")
    assert everything[:5] == ["apptainer", "exec", "--nv", "t.sif", "tritonserver"]
    assert "--model-control-mode=none" in everything and not any("backend-directory" in a for a in everything)
    assert "--grpc-restricted-protocol=shared-memory,model-config,model-repository,statistics,trace,logging:admin-key=s3cret" in everything
    assert "--http-restricted-api=shared-memory,model-config,model-repository,statistics,trace,logging:admin-key=s3cret" in everything
    assert not any("s3cret" in arg for arg in redact(everything, "s3cret"))


def test_bundled_server_environment_finds_libpython_and_the_virtualenv() -> None:
    import sysconfig

    env = server_environment(True, "7", base={"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    libs = env["LD_LIBRARY_PATH"].split(":")
    assert libs[0] == sysconfig.get_config_var("LIBDIR")
    assert libs[1].endswith("nvidia_pytriton.libs") and libs[-1] == "/opt/lib"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")
    assert env["CUDA_VISIBLE_DEVICES"] == "7"
    plain = server_environment(False, None, base={"PATH": "/usr/bin"})
    assert plain["PATH"] == "/usr/bin" and "LD_LIBRARY_PATH" not in plain and "CUDA_VISIBLE_DEVICES" not in plain


def test_addresses_and_ports(tmp_path: Path) -> None:
    import socket

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert connect_host("0.0.0.0") == "127.0.0.1" and connect_host("::1") == "[::1]"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"--grpc-port {port}: port in use"):
            check_port_free("127.0.0.1", port, "--grpc-port")
    check_port_free("127.0.0.1", port, "--grpc-port")  # free again


def _listening(port: int = 0) -> socket.socket | None:
    """A socket listening on loopback ``port`` (0: any), or None when that port cannot be had."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


def test_ports_stay_unless_one_is_taken() -> None:
    http, grpc, metrics = free_ports(3)
    options = ServerOptions(repo="r", http_port=http, grpc_port=grpc, metrics_port=metrics, ready_timeout=5.0)
    assert free_ports_if_taken(options) == options
    busy = _listening()
    assert busy is not None
    with busy:
        taken = ServerOptions(repo="r", http_port=busy.getsockname()[1], grpc_port=grpc, metrics_port=metrics,
                              ready_timeout=5.0)
        moved = free_ports_if_taken(taken)
        ports = [getattr(moved, name) for name in PORT_FIELDS]
        assert busy.getsockname()[1] not in ports and len(set(ports)) == 3
        assert replace(moved, http_port=0, grpc_port=0, metrics_port=0) == replace(
            taken, http_port=0, grpc_port=0, metrics_port=0)
        check_ports(moved)  # all three free


def test_repository_options_need_a_model_and_find_free_ports_only_when_none_are_given(tmp_path: Path) -> None:
    repo = tmp_path / "triton"
    with pytest.raises(NothingToServe, match=f"^no models in {repo}$"):
        repository_options(repo, {})  # no folder
    (repo / "policy" / "1").mkdir(parents=True)
    with pytest.raises(NothingToServe) as error:
        repository_options(repo, {})  # a folder without config.pbtxt is no model
    assert isinstance(error.value, UserError) and error.value.repo == repo
    (repo / "policy" / "config.pbtxt").write_text('name: "policy"\n')
    # The default HTTP port taken (by this test, or by someone else already): free ports instead.
    busy = _listening(DEFAULT_HTTP_PORT)
    try:
        options = repository_options(repo, {"ready_timeout": 7.0})
        assert options.repo == str(repo) and options.ready_timeout == 7.0 and options.models == ()
        assert options.http_port != DEFAULT_HTTP_PORT
        check_ports(options)
        # Ports given are kept as they are, taken or not (the server's start says so).
        given = repository_options(repo, {"http_port": DEFAULT_HTTP_PORT, "grpc_port": 1, "metrics_port": 2})
        assert (given.http_port, given.grpc_port, given.metrics_port) == (DEFAULT_HTTP_PORT, 1, 2)
    finally:
        if busy is not None:
            busy.close()


def test_admin_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    workspace = Workspace.open(tmp_path / "ws")
    assert resolve_admin_key(workspace, "127.0.0.1", None) is None
    path = resolve_admin_key(workspace, "0.0.0.0", None)
    assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert len(key) >= 32
    assert resolve_admin_key(workspace, "0.0.0.0", None).read_text().strip() == key  # kept
    assert resolve_admin_key(workspace, "127.0.0.1", "mine").read_text().strip() == "mine"
    with pytest.raises(UserError, match="--admin-key"):
        resolve_admin_key(workspace, "0.0.0.0", "a b")


def test_log_excerpt_prefers_model_failures(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    log.write_text(
        "[oatui] starting: tritonserver ...\n"
        'E1124 05:29:17.9 1 server.cc:241] "CudaDriverHelper has not been initialized."\n'
        'E1124 05:29:18.3 1 model_lifecycle.cc:642] "failed to load \'rm\' version 1: Internal: ValueError: boom\\n\\nAt:\\n  x.py(1)"\n'
        "| rm | 1 | UNAVAILABLE: Internal: ValueError: boom |\n"
        "error: creating server: Internal - failed to load all models\n"
    )
    assert log_excerpt(log) == ("failed to load 'rm' version 1: Internal: ValueError: boom | "
                                "error: creating server: Internal - failed to load all models")


def test_a_server_that_never_gets_ready_is_stopped_with_its_log(tmp_path: Path) -> None:
    """A missing shared library makes tritonserver hang silently: the readiness timeout ends it."""
    workspace = tmp_path / "ws"
    repo = workspace / "triton" / "m"
    repo.mkdir(parents=True)
    (repo / "config.pbtxt").write_text('name: "m"\nbackend: "python"\n')
    fake = tmp_path / "fake-tritonserver"
    fake.write_text('#!/bin/sh\necho "E1124 00:00:00.0 1 x.cc:1] \\"libfoo.so: cannot open shared object\\""\n'
                    'echo $$ > "$0.pid"\nexec sleep 60\n')
    fake.chmod(0o755)
    started = time.monotonic()
    result = run_oatui("serve", "--server-bin", f"{fake} --flag", "--ready-timeout", "1.5",
                       "--http-port", "0", workspace=workspace)
    assert result.returncode == 2 and "--http-port 0" in result.stderr  # port numbers are checked first
    http, grpc, metrics = free_ports(3)
    result = run_oatui("serve", "--server-bin", f"{fake} --flag", "--ready-timeout", "1.5", "--http-port", str(http),
                       "--grpc-port", str(grpc), "--metrics-port", str(metrics), workspace=workspace)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "not ready after 1.5 s" in lines[0] and "libfoo.so: cannot open shared object" in lines[0]
    assert time.monotonic() - started < 30
    pid = int((tmp_path / "fake-tritonserver.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    logs = list((workspace / "logs").glob("tritonserver-*.log"))
    assert logs and "--flag" in logs[0].read_text()


def test_a_failed_start_never_shows_the_admin_key(tmp_path: Path) -> None:
    """The log excerpt in the error reaches stderr and server-error.json: a server that echoes its
    command line (the key included) into its log must not carry the key there."""
    workspace = tmp_path / "ws"
    (workspace / "triton" / "m").mkdir(parents=True)
    (workspace / "triton" / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\n')
    fake = tmp_path / "echoing-tritonserver"
    fake.write_text('#!/bin/sh\nfor arg in "$@"; do case "$arg" in *restricted*)\n'
                    '  echo "E1124 00:00:00.0 1 x.cc:1] \\"cannot use $arg\\"";; esac; done\nexit 3\n')
    fake.chmod(0o755)
    for mode in ([], ["--detach"]):
        http, grpc, metrics = free_ports(3)
        result = run_oatui("serve", "--server-bin", str(fake), "--admin-key", "k3y-for-tests", "--ready-timeout", "5",
                           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *mode,
                           workspace=workspace)
        assert result.returncode == 2, result.stderr
        error = result.stderr.strip().splitlines()[-1]  # after the line saying where the key is stored
        assert error.startswith("oatui serve: error: tritonserver exited with status 3"), result.stderr
        assert "--grpc-restricted-protocol=shared-memory,model-config,model-repository,statistics,trace,logging:admin-key=***" in error
        assert "k3y-for-tests" not in result.stderr
    error_record = (workspace / "state" / "server-error.json").read_text()
    assert "admin-key=***" in error_record and "k3y-for-tests" not in error_record


def test_readiness_polls_bypass_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib sends even 127.0.0.1 through http_proxy (only no_proxy exempts a host): polled that
    way, every start on a machine with a proxy configured would time out."""
    import http.server
    import threading

    ready_paths = {"/v2/health/ready", "/v2/models/m/ready"}

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            self.send_response(200 if self.path in ready_paths else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    (dead,) = free_ports(1)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{dead}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{httpd.server_address[1]}"
            assert wait_ready(url, ["m"], timeout=5)
            assert not wait_ready(url, ["m", "other"], timeout=0.3)
        finally:
            httpd.shutdown()


def test_clients_reach_a_local_server_despite_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC sends even 127.0.0.1 through http_proxy unless no_proxy names it: every client of a
    local server connects directly (a stand-in server answers the model-config call)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

    from oatui.serve.client import AsyncChatClient, ChatClient, ScoreClient

    class ConfigOnly(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ModelConfig(self, request, context):  # noqa: ANN001, ANN201, N802 - the gRPC method name
            config = model_config_pb2.ModelConfig(name=request.name, max_batch_size=7)
            config.parameters["eos_token"].string_value = "<eos>"
            return service_pb2.ModelConfigResponse(config=config)

    (dead,) = free_ports(1)
    for name in ("grpc_proxy", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{dead}")
    for name in ("no_grpc_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = grpc.server(ThreadPoolExecutor(2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(ConfigOnly(), server)
    url = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        with ScoreClient(f"{url}/rm", timeout=5, retries=0) as scores:
            assert scores.max_batch_size() == 7
        with ChatClient(url, timeout=5, retries=0) as chat:
            assert chat.eos_token() == "<eos>"

        async def async_eos() -> str:
            async with AsyncChatClient(url, timeout=5, retries=0) as client:
                return await client.eos_token()

        assert asyncio.run(async_eos()) == "<eos>"
    finally:
        server.stop(0)


def test_ranking_ends_quietly_when_the_input_ends(tmp_path: Path) -> None:
    """Ctrl-D (or the end of piped input) at the ranking or edit prompt skips: nothing saved, no traceback."""
    import argparse
    import io

    from oatui.commands.chat import rank_answers

    class Client:
        def stream(self, **request):  # noqa: ANN003, ANN202
            yield f"answer with seed {request['seed']}"

    args = argparse.Namespace(system=None, workspace=str(tmp_path / "ws"), model="policy", lang="en")
    for replies in ([], ["e1"]):
        pending = list(replies)

        def read(prompt: str) -> str:
            if not pending:
                raise EOFError
            return pending.pop(0)

        out = io.StringIO()
        assert rank_answers(Client(), [("prompter", "hi")], 2, args, {"seed": 5}, out, read=read) is None
        assert "answer with seed 6" in out.getvalue() and "skipped: nothing saved" in out.getvalue()
    assert not list((tmp_path / "ws").rglob("feedback*"))


def test_ctrl_c_while_the_server_starts_stops_it_at_once(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    (workspace / "triton" / "m").mkdir(parents=True)
    (workspace / "triton" / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\n')
    fake = tmp_path / "slow-tritonserver"
    fake.write_text('#!/bin/sh\necho $$ > "$0.pid"\nexec sleep 60\n')
    fake.chmod(0o755)
    http, grpc, metrics = free_ports(3)
    process = subprocess.Popen([OATUI, "serve", "--workspace", str(workspace), "--server-bin", str(fake),
                                "--ready-timeout", "60", "--http-port", str(http), "--grpc-port", str(grpc),
                                "--metrics-port", str(metrics)], stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "slow-tritonserver.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists()
    process.send_signal(2)  # SIGINT, as Ctrl-C
    started = time.monotonic()
    assert process.wait(timeout=30) == 130
    assert time.monotonic() - started < 20
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


# ---------------------------------------------------------------------------------------------
# Export files (no server)


def test_config_text_for_each_mode() -> None:
    from oatui.serve.repository import config_text

    policy = config_text("policy", "policy", {"model_path": '/a "b"\\c'})
    assert "model_transaction_policy { decoupled: true }" in policy and "max_batch_size: 0" in policy
    assert "kind: KIND_MODEL" in policy and "KIND_GPU" not in policy
    assert 'string_value: "/a \\"b\\"\\\\c"' in policy
    rm = config_text("rm", "rm", {}, max_batch=8)
    assert "max_batch_size: 8" in rm and "dynamic_batching" in rm and "TYPE_FP32" in rm
    ref = config_text("ref", "ref", {})
    assert 'name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ]' in ref and 'name: "logprobs"' in ref


def test_streaming_models_are_the_decoupled_ones_of_a_repository(tmp_path: Path) -> None:
    from oatui.serve.repository import config_text, streaming_models, vllm_config_text

    repo = tmp_path / "triton"
    assert streaming_models(repo) == []  # no repository yet
    for name, text in [("policy", config_text("policy", "policy", {})), ("rm", config_text("rm", "rm", {})),
                       ("llm", vllm_config_text("llm", {"eos_token": "</s>"})),
                       ("commented", config_text("rm", "commented", {}) + "# decoupled: true\n"),
                       (".hidden", config_text("policy", ".hidden", {}))]:
        (repo / name).mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(text)
    (repo / "no-config").mkdir()
    assert streaming_models(repo) == ["llm", "policy"]


def test_export_errors_are_one_line(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    result = run_oatui("export", "--mode", "rm", "--model", str(tmp_path / "missing"), workspace=workspace)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--model" in result.stderr and "no such folder" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_oatui("export", "--mode", "ref", "--model", str(empty), workspace=workspace)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no config.json" in result.stderr
    (empty / "config.json").write_text('{"model_type": "gpt_neox"}')
    result = run_oatui("export", "--mode", "policy", "--model", str(empty), workspace=workspace)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no tokenizer saved" in result.stderr
    result = run_oatui("export", "--mode", "nope", "--model", str(empty), workspace=workspace)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert not (workspace / "triton").exists() or not any((workspace / "triton").iterdir())


def test_the_run_behind_an_export_is_read_from_its_record_or_its_checkpoint_path(tmp_path: Path) -> None:
    from oatui.serve.repository import EXPORT_INFO, ExportSource, read_export_source, source_run
    from oatui.serve.record import ServerInfo
    from oatui.stages.rundir import RunDir, RunInfo

    info = RunInfo(id="rl-20261124-093000-5e1f", stage="rl", state="succeeded", created=1.0e9, configs=["tiny_rl"])
    run = RunDir.create(tmp_path / "runs", info, "model_name: tiny\n")
    run.metrics_path.write_text("".join(json.dumps({"step": step, "total_steps": 30}) + "\n" for step in (10, 30)))
    assert source_run(run.path / "final") == ExportSource("rl-20261124-093000-5e1f", 30)
    assert source_run(run.path / "checkpoints" / "checkpoint-20") == ExportSource("rl-20261124-093000-5e1f", 20)
    assert source_run(tmp_path / "models" / "tiny-pythia") == ExportSource()
    assert source_run(tmp_path / "elsewhere" / "final") == ExportSource()  # no run.json beside it

    recorded, older, foreign, broken = (tmp_path / "triton" / name for name in ("policy", "rm", "ref", "bad"))
    for folder, record in ((recorded, {"source": "/x/final", "run_id": "sft-a", "step": 40}),
                           (older, {"source": str(run.path / "final")}),
                           (foreign, {"source": "/models/pythia", "run_id": None, "step": None})):
        folder.mkdir(parents=True)
        (folder / EXPORT_INFO).write_text(json.dumps(record))
    broken.mkdir()
    (broken / EXPORT_INFO).write_text("{")
    assert read_export_source(recorded) == ExportSource("sft-a", 40)
    assert read_export_source(older) == ExportSource("rl-20261124-093000-5e1f", 30)  # written before run_id was
    assert read_export_source(foreign) == ExportSource() and read_export_source(broken) == ExportSource()
    assert ExportSource("sft-a", 40).label() == "sft-a step 40" and ExportSource("sft-a").label() == "sft-a"
    assert ExportSource().label() is None

    record = {"pid": 10, "supervisor_pid": 11, "address": "127.0.0.1", "http_port": 8000, "grpc_port": 8001,
              "metrics_port": 8002, "repo": "/ws/triton", "models": ["policy", "rm"], "log": "/ws/log",
              "started": 1.0, "model_runs": {"policy": "sft-a"}, "model_steps": {"policy": 40}}
    server = ServerInfo.from_dict(record)
    assert server.served_label("policy") == "policy (sft-a step 40)" and server.served_label("rm") == "rm"
    legacy = ServerInfo.from_dict({key: value for key, value in record.items() if not key.startswith("model_")})
    assert legacy.model_runs == {} and legacy.served_label("policy") == "policy"
    with pytest.raises(ValueError, match="model_steps"):
        ServerInfo.from_dict({**record, "model_steps": {"policy": "40"}})


def test_server_and_client_modules_stay_light() -> None:
    """The UI imports these: no torch, no transformers."""
    code = ("import sys, oatui.serve.server, oatui.serve.client, oatui.serve.repository; "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert json.loads(out.replace("'", '"')) == []
