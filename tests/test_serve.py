"""Serving against the real tritonserver (bundled in nvidia-pytriton) on free loopback ports.

One server with the three exported models serves most tests of this module; the tests that kill
or detach a server start their own, with the policy model only.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers import OATUI, run_oatui
from oatui.netutil import free_ports
from oatui.serve.client import (
    AsyncChatClient,
    ChatClient,
    RefLogprobClient,
    RemoteError,
    ScoreClient,
    ServerUnavailable,
    TritonAddress,
)
from oatui.serve.record import ServerOptions
from oatui.serve.server import TritonServer
from oatui.workspace import Workspace

pytestmark = pytest.mark.slow

RM_MAX_BATCH = 4


def options_for(repo: Path, models: tuple[str, ...] = ()) -> ServerOptions:
    http, grpc, metrics = free_ports(3)
    return ServerOptions(repo=str(repo), http_port=http, grpc_port=grpc, metrics_port=metrics, models=models)


def shm_files() -> set[str]:
    return set(glob.glob("/dev/shm/triton_python_backend_shm*"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not running
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def repo(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """policy and ref from the SFT run (by run id), rm from the RM run (by folder), via `oatui export`."""
    repo = tmp_path_factory.mktemp("serve") / "repo"
    for mode, model, extra in (("policy", trained.sft_run, []), ("ref", trained.sft_run, []),
                               ("rm", str(trained.rm_model), ["--max-batch", str(RM_MAX_BATCH)])):
        result = run_oatui("export", "--mode", mode, "--model", model, "--repo", str(repo), *extra,
                           workspace=trained.root)
        assert result.returncode == 0, result.stderr
    # The policy again, declaring only Triton's LLM conventions (as a model of its vLLM backend does).
    result = run_oatui("export", "--mode", "policy", "--name", "policy-llm", "--model", trained.sft_run, "--repo",
                       str(repo), workspace=trained.root)
    assert result.returncode == 0, result.stderr
    config = repo / "policy-llm" / "config.pbtxt"
    lines = config.read_text().splitlines()
    config.write_text("\n".join(line for line in lines if not re.search(r'name: "(text|prompt|system)" ', line)) + "\n")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    workspace = Workspace.open(tmp_path_factory.mktemp("serve-ws") / "ws")
    server = TritonServer(workspace, options_for(repo))
    started = time.monotonic()
    server.start()
    print(f"tritonserver with policy, ref, rm ready in {time.monotonic() - started:.1f} s")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def grpc_url(server: TritonServer) -> str:
    return server.info().grpc_url


def metric(server: TritonServer, name: str) -> float:
    """The metric summed over its label sets (the models)."""
    url = f"http://127.0.0.1:{server.options.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
        return sum(float(line.rsplit(" ", 1)[1]) for line in response.read().decode().splitlines()
                   if line.startswith(name + "{"))


# ---------------------------------------------------------------------------------------------
# The repository


def test_export_writes_a_standard_repository(repo: Path, trained) -> None:  # noqa: ANN001
    assert sorted(p.name for p in repo.iterdir()) == ["policy", "policy-llm", "ref", "rm"]
    for name in ("policy", "ref", "rm"):
        assert (repo / name / "config.pbtxt").is_file() and (repo / name / "1" / "model.py").is_file()
        assert stat.S_IMODE((repo / name).stat().st_mode) == 0o700  # private, as the whole workspace
    policy = (repo / "policy" / "config.pbtxt").read_text()
    assert "decoupled: true" in policy and "KIND_MODEL" in policy
    assert f'string_value: "{trained.sft_model}"' in policy  # by absolute path, not copied
    assert not (repo / "policy" / "1" / "checkpoint").exists()
    assert f"max_batch_size: {RM_MAX_BATCH}" in (repo / "rm" / "config.pbtxt").read_text()
    # Replacing needs --force; --copy puts the checkpoint inside the version folder.
    again = run_oatui("export", "--mode", "rm", "--model", str(trained.rm_model), "--repo", str(repo))
    assert again.returncode == 2 and "--force" in again.stderr and again.stderr.count("\n") == 1
    copied = run_oatui("export", "--mode", "rm", "--model", str(trained.rm_model), "--repo", str(repo.parent / "moved"),
                       "--copy")
    assert copied.returncode == 0, copied.stderr
    target = repo.parent / "moved" / "rm"
    assert (target / "1" / "checkpoint" / "config.json").is_file()
    assert 'key: "model_path" value: { string_value: "checkpoint" }' in (target / "config.pbtxt").read_text()
    assert not [p for p in repo.parent.iterdir() if ".moved-" in p.name or "-export-" in p.name]  # no temp left


# ---------------------------------------------------------------------------------------------
# Chat


def test_chat_streams_pieces_and_equals_the_in_process_loop(grpc_url: str, trained) -> None:  # noqa: ANN001
    from oatui.data.format import format_conversation
    from oatui.models.loading import load_for_inference
    from oatui.serve.generation import SamplingParams, stream_text

    with ChatClient(grpc_url, timeout=30) as client:
        pieces = list(client.stream(prompt="How do I get started with baking bread?", max_new_tokens=40,
                                    temperature=0, stream_interval_ms=0))
        assert len(pieces) >= 10 and all(pieces)  # one response per piece (a token, or a whole character)
        # By default pieces closer than 10 ms are grouped: fewer responses, the same text.
        grouped = list(client.stream(prompt="How do I get started with baking bread?", max_new_tokens=40,
                                     temperature=0))
        assert "".join(grouped) == "".join(pieces) and 1 <= len(grouped) <= len(pieces)
        # The same conversation through turns (chat format built here with the model's EOS) and text.
        turns = [("prompter", "How do I get started with baking bread?")]
        assert "".join(client.stream(turns=turns, max_new_tokens=40, temperature=0)) == "".join(pieces)
        model, tokenizer = load_for_inference(str(trained.sft_model), "policy")
        text = format_conversation(turns, tokenizer.eos_token, add_generation_prompt=True)
        assert "".join(client.stream(text, max_new_tokens=40, temperature=0)) == "".join(pieces)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        local = list(stream_text(model, tokenizer, ids, SamplingParams(max_new_tokens=40, temperature=0)))
        assert "".join(local) == "".join(pieces)
        # Seeded sampling repeats; a system message changes the conversation.
        first = "".join(client.stream(prompt="Tell me about tea.", seed=11, max_new_tokens=30))
        assert "".join(client.stream(prompt="Tell me about tea.", seed=11, max_new_tokens=30)) == first


def wait_for_metric(server: TritonServer, name: str, value: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while (current := metric(server, name)) < value and time.monotonic() < deadline:
        time.sleep(0.05)
    return current


def test_cancelling_mid_stream_stops_generation_on_the_server(server: TritonServer, grpc_url: str) -> None:
    """The server counts generated tokens (a metric): a cancelled 480-token answer stops early."""
    tokens_before = metric(server, "oatui_generated_tokens_total")
    cancelled_before = metric(server, "oatui_cancelled_requests_total")
    with ChatClient(grpc_url, timeout=30) as client:
        stream = client.stream(prompt="Tell me a long story.", max_new_tokens=480, ignore_eos=True)
        received = [next(stream) for _ in range(3)]
        stream.close()  # leaving early cancels the request
        assert len(received) == 3
        assert wait_for_metric(server, "oatui_cancelled_requests_total", cancelled_before + 1) == cancelled_before + 1
        generated = metric(server, "oatui_generated_tokens_total") - tokens_before
        assert 3 <= generated < 240, f"the server generated {generated} of 480 tokens after the cancel"
        # cancel() (from any thread) ends the iteration quietly, and the server is free at once.
        stream = client.stream(prompt="Another long one.", max_new_tokens=480, ignore_eos=True)
        next(stream)
        client.cancel()
        assert len(list(stream)) < 100  # pieces already on their way may still come
        assert wait_for_metric(server, "oatui_cancelled_requests_total", cancelled_before + 2) == cancelled_before + 2
        started = time.monotonic()
        assert "".join(client.stream(prompt="Quick?", max_new_tokens=5))
        assert time.monotonic() - started < 5
    assert metric(server, "oatui_generated_tokens_total") - tokens_before < 480
    text = Path(server.log_path).read_text()
    assert "generated" in text and "(cancelled)" in text


def test_async_chat_streams_and_cancels(server: TritonServer, grpc_url: str) -> None:
    async def scenario() -> tuple[list[str], int, bool]:
        async with AsyncChatClient(grpc_url, timeout=30) as client:
            # Long enough to span several of the server's 10 ms response intervals whatever the
            # model answers (ignore_eos): a short answer may come as the first piece and the rest.
            pieces = [piece async for piece in client.stream(prompt="Hello!", max_new_tokens=100, temperature=0,
                                                             ignore_eos=True)]
            got: list[str] = []

            async def consume() -> None:
                async for piece in client.stream(prompt="Go on and on.", max_new_tokens=480, ignore_eos=True):
                    got.append(piece)

            task = asyncio.create_task(consume())
            while len(got) < 3:
                await asyncio.sleep(0.001)
            task.cancel()  # what the UI does on Esc
            try:
                await task
                cancelled = False
            except asyncio.CancelledError:
                cancelled = True
            return pieces, len(got), cancelled

    cancelled_before = metric(server, "oatui_cancelled_requests_total")
    pieces, got, cancelled = asyncio.run(scenario())
    assert len(pieces) >= 3 and cancelled and got < 480
    with ChatClient(grpc_url) as client:
        again = client.stream(prompt="Hello!", max_new_tokens=100, temperature=0, ignore_eos=True)
        assert "".join(again) == "".join(pieces)
    assert wait_for_metric(server, "oatui_cancelled_requests_total", cancelled_before + 1) == cancelled_before + 1


# ---------------------------------------------------------------------------------------------
# Batched decoding: requests that overlap are generated together

CONCURRENT_PROMPTS = ["How do I bake bread?", "Why is the sky blue?", "Write a poem about the sea.",
                      "How do vaccines work?", "What is a healthy breakfast?", "Explain recursion.",
                      "How do I keep a plant alive?", "Give me three tips for sleeping better."]


def stream_at_once(url: str, prompts: list[str], cancel_index: int | None = None, **sampling) -> list[dict]:  # noqa: ANN003
    """One ChatClient thread per prompt, started together: each stream's text and when its first and
    last pieces came; the stream at ``cancel_index`` asks for 400 tokens and is closed after its
    third piece."""
    import threading

    results = [{} for _ in prompts]
    start_line = threading.Barrier(len(prompts))

    def stream(index: int) -> None:
        with ChatClient(url, timeout=60) as client:
            start_line.wait()
            pieces = []
            own = {**sampling, "max_new_tokens": 400} if index == cancel_index else sampling
            iterator = client.stream(prompt=prompts[index], **own)
            for piece in iterator:
                if not pieces:
                    results[index]["first"] = time.monotonic()
                pieces.append(piece)
                if index == cancel_index and len(pieces) == 3:
                    iterator.close()
                    break
            results[index].update(text="".join(pieces), last=time.monotonic())

    threads = [threading.Thread(target=stream, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all("last" in result for result in results), "a stream did not finish"
    return results


def test_concurrent_streams_overlap_and_greedy_is_the_same_alone_and_batched(grpc_url: str) -> None:
    prompts = CONCURRENT_PROMPTS[:4]
    sampling = dict(max_new_tokens=160, temperature=0, ignore_eos=True)
    with ChatClient(grpc_url, timeout=30) as client:
        alone = ["".join(client.stream(prompt=prompt, **sampling)) for prompt in prompts]
    results = stream_at_once(grpc_url, prompts, **sampling)
    assert [r["text"] for r in results] == alone
    # Generated together: every stream had its first piece before any stream ended (one at a time,
    # the second would start only after the first was done).
    assert max(r["first"] for r in results) < min(r["last"] for r in results)
    # Seeded sampling too is the same alone and batched.
    seeded = dict(max_new_tokens=40, temperature=0.9, top_k=40, seed=5)
    with ChatClient(grpc_url, timeout=30) as client:
        alone = ["".join(client.stream(prompt=prompt, **seeded)) for prompt in prompts]
    assert [r["text"] for r in stream_at_once(grpc_url, prompts, **seeded)] == alone


def test_cancelling_one_of_eight_streams_stops_it_and_the_others_finish_the_same(server: TritonServer,
                                                                                 grpc_url: str) -> None:
    sampling = dict(max_new_tokens=48, temperature=0, ignore_eos=True)
    with ChatClient(grpc_url, timeout=30) as client:
        alone = ["".join(client.stream(prompt=prompt, **sampling)) for prompt in CONCURRENT_PROMPTS]
    tokens_before = metric(server, "oatui_generated_tokens_total")
    cancelled_before = metric(server, "oatui_cancelled_requests_total")
    results = stream_at_once(grpc_url, CONCURRENT_PROMPTS, cancel_index=2, **sampling)
    assert [r["text"] for i, r in enumerate(results) if i != 2] == alone[:2] + alone[3:]
    assert results[2]["text"] and alone[2].startswith(results[2]["text"][:len(alone[2])])
    assert wait_for_metric(server, "oatui_cancelled_requests_total", cancelled_before + 1) == cancelled_before + 1
    generated = metric(server, "oatui_generated_tokens_total") - tokens_before
    assert 7 * 48 < generated < 7 * 48 + 200, f"the server generated {generated} tokens: 7 x 48, and 400 asked, cancelled"


def test_the_batch_gauges_show_running_requests_and_fall_back_to_zero(server: TritonServer, grpc_url: str) -> None:
    """oatui_running_requests counts the requests in the batch while they run (set at most every
    0.1 s under load) and is back at 0, with nothing queued, once the model is idle."""
    import threading

    clients = [ChatClient(grpc_url, timeout=60) for _ in range(3)]
    started = threading.Barrier(len(clients) + 1)

    def stream(client: ChatClient) -> None:
        pieces = client.stream(prompt="Tell me a long story.", max_new_tokens=480, ignore_eos=True)
        next(pieces)
        started.wait()
        for _ in pieces:  # until the cancel below ends it
            pass

    threads = [threading.Thread(target=stream, args=(client,)) for client in clients]
    try:
        for thread in threads:
            thread.start()
        started.wait(timeout=60)
        assert wait_for_metric(server, "oatui_running_requests", 3) >= 3
    finally:
        for client in clients:
            client.cancel()
        for thread in threads:
            thread.join(timeout=60)
        for client in clients:
            client.close()
    deadline = time.monotonic() + 10
    while metric(server, "oatui_running_requests") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "oatui_running_requests") == 0
    assert metric(server, "oatui_queued_requests") == 0


def http_post(server: TritonServer, path: str, body: dict) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{server.options.http_port}{path}", method="POST",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        return response.read().decode()


def test_http_generate_and_generate_stream_with_text_input(server: TritonServer, grpc_url: str) -> None:
    """Triton's LLM conventions (its vLLM backend's): what a client written for those sends, over HTTP."""
    with ChatClient(grpc_url, timeout=30) as client:
        answer = "".join(client.stream(prompt="Why is the sky blue?", max_new_tokens=16, temperature=0))
        eos = client.eos_token()
    from oatui.data.format import format_conversation

    text = format_conversation([("prompter", "Why is the sky blue?")], eos, add_generation_prompt=True)
    # generate: one response; not streaming, the input comes first (exclude_input_in_output false).
    reply = json.loads(http_post(server, "/v2/models/policy/generate",
                                 {"text_input": text, "parameters": {"max_tokens": 16, "temperature": 0}}))
    assert reply["model_name"] == "policy" and reply["text_output"] == text + answer
    # sampling_parameters as a JSON string, values as strings (as the vLLM backend's sample client).
    reply = json.loads(http_post(server, "/v2/models/policy/generate", {
        "text_input": text, "exclude_input_in_output": True,
        "sampling_parameters": json.dumps({"max_tokens": "16", "temperature": "0", "top_k": -1})}))
    assert reply["text_output"] == answer
    # generate_stream: server-sent events, one per piece; the input left out when streaming.
    events = http_post(server, "/v2/models/policy/generate_stream",
                       {"text_input": text, "stream": True,
                        "parameters": {"max_tokens": 16, "temperature": 0, "stream_interval_ms": 0}})
    pieces = [json.loads(line[len("data:"):])["text_output"] for line in events.splitlines() if line.startswith("data:")]
    assert len(pieces) >= 5 and "".join(pieces) == answer
    # Not streaming through generate_stream: one event with the whole answer.
    events = http_post(server, "/v2/models/policy/generate_stream",
                       {"text_input": text, "exclude_input_in_output": True, "parameters": {"max_tokens": 16, "temperature": 0}})
    assert [json.loads(line[5:])["text_output"] for line in events.splitlines() if line.startswith("data:")] == [answer]
    # A bad parameter is a 400 naming it; the model keeps serving.
    with pytest.raises(urllib.error.HTTPError) as failure:
        http_post(server, "/v2/models/policy/generate", {"text_input": text, "parameters": {"max_tokens": 0}})
    assert failure.value.code == 400 and "max_new_tokens must be at least 1" in failure.value.read().decode()
    with pytest.raises(urllib.error.HTTPError) as failure:
        http_post(server, "/v2/models/policy/generate", {"text_input": text, "prompt": "two inputs"})
    assert failure.value.code == 400 and "exactly one of" in failure.value.read().decode()


def test_chat_clients_speak_the_llm_conventions_to_a_model_that_takes_only_those(grpc_url: str) -> None:
    """A model without oatui's inputs (one of Triton's vLLM backend) refuses them; the clients then
    send text_input, stream and sampling_parameters, and the answers are the same."""
    requests = [dict(prompt="Why is the sky blue?"), dict(prompt="Hi", system="Be brief."),
                dict(turns=[("prompter", "Hello"), ("assistant", "Hi!"), ("prompter", "How do I bake bread?")])]
    sampling = dict(max_new_tokens=24, temperature=0, top_k=0)
    with ChatClient(grpc_url, timeout=30) as oatui_inputs, ChatClient(grpc_url, model="policy-llm", timeout=30) as llm:
        expected = ["".join(oatui_inputs.stream(**request, **sampling)) for request in requests]
        assert ["".join(llm.stream(**request, **sampling)) for request in requests] == expected
        assert llm._llm and not oatui_inputs._llm
        # Leaving early still cancels.
        stream = llm.stream(prompt="Tell me a long story.", max_new_tokens=400, ignore_eos=True)
        next(stream)
        stream.close()

    async def scenario() -> list[str]:
        async with AsyncChatClient(grpc_url, model="policy-llm", timeout=30) as client:
            return ["".join([piece async for piece in client.stream(**request, **sampling)]) for request in requests]

    assert asyncio.run(scenario()) == expected


# ---------------------------------------------------------------------------------------------
# Reward model and reference model


def test_scores_equal_the_in_process_reward_model(grpc_url: str, trained) -> None:  # noqa: ANN001
    from oatui.data.datasets import rm_text
    from oatui.data.rules import Turn
    from oatui.models.loading import load_for_inference
    from oatui.models.scoring import rm_max_length, score_texts

    model, tokenizer = load_for_inference(str(trained.rm_model), "rm")
    eos = tokenizer.eos_token
    context = [Turn("prompter", "How do I get started with baking bread?")]
    replies = ["Start with a simple recipe: flour, water, salt and yeast.", "No.", "Bread is 🍞 — try it!",
               "Knead for ten minutes, let it rise, then bake at 220 °C.", "x " * 700]  # the last one is cut
    texts = [rm_text(context, reply, eos) for reply in replies] * 2  # 10 rows: more than one batch of 4
    local = score_texts(model, tokenizer, texts, rm_max_length(model, tokenizer))
    with ScoreClient(f"{grpc_url}/rm") as client:
        served = client.score(texts)
        assert client.max_batch_size() == RM_MAX_BATCH
        assert client.score([]) == []
    assert len(served) == len(texts)
    assert np.allclose(served, local, atol=1e-4, rtol=0), (served, local)
    assert len(set(round(s, 4) for s in served[:4])) > 1  # the scores say something


def test_ref_logprobs_equal_the_in_process_ones(grpc_url: str, trained) -> None:  # noqa: ANN001
    import torch

    from oatui.models.loading import load_for_inference
    from oatui.models.scoring import token_logprobs

    model, tokenizer = load_for_inference(str(trained.sft_model), "ref")
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in
            ("<|prompter|>Hi<|endoftext|><|assistant|>Hello there, how can I help?<|endoftext|>",
             "<|prompter|>What is bread?<|endoftext|><|assistant|>Food.<|endoftext|>")]
    width = max(len(r) for r in rows)
    ids = np.full((2, width), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((2, width), dtype=np.int64)
    ids[0, : len(rows[0])], mask[0, : len(rows[0])] = rows[0], 1  # right padded
    ids[1, width - len(rows[1]):], mask[1, width - len(rows[1]):] = rows[1], 1  # left padded
    with torch.no_grad():
        local = token_logprobs(model, torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    with RefLogprobClient(TritonAddress.parse(f"{grpc_url}/ref")) as client:
        served = client.logprobs(ids, mask)
        assert served.dtype == np.float32 and served.shape == (2, width - 1)
        assert np.allclose(served, local, atol=1e-4, rtol=0)
        # Without a mask: all ones; a batch bigger than max_batch_size is split.
        many = np.tile(ids[:1], (37, 1))
        assert np.allclose(client.logprobs(many)[5], client.logprobs(ids[:1])[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input and unavailable servers


def test_bad_inputs_get_triton_errors_and_the_server_keeps_serving(grpc_url: str) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    raw = grpcclient.InferenceServerClient(grpc_url)
    wrong = grpcclient.InferInput("input_ids", [1, 4], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="data-type is 'FP32', but model 'ref' expects 'INT64'"):
        raw.infer("ref", [wrong], client_timeout=10)
    shaped = grpcclient.InferInput("input_ids", [4], "INT64")
    shaped.set_data_from_numpy(np.zeros(4, dtype=np.int64))
    with pytest.raises(InferenceServerException):
        raw.infer("ref", [shaped], client_timeout=10)
    raw.close()
    with RefLogprobClient(f"{grpc_url}/ref") as ref:
        with pytest.raises(RemoteError, match="reads at most"):
            ref.logprobs(np.ones((1, 4000), dtype=np.int64))
        with pytest.raises(RemoteError, match="outside"):
            ref.logprobs(np.array([[1, 2, 10**9]]))
        with pytest.raises(RemoteError, match="0 and 1"):
            ref.logprobs(np.array([[1, 2, 3]]), np.array([[1, 2, 1]]))
    with ScoreClient(f"{grpc_url}/rm") as rm:
        with pytest.raises(RemoteError, match="empty"):
            rm.score(["fine", "   "])
    with ChatClient(grpc_url, timeout=30) as chat:
        with pytest.raises(RemoteError, match="must end with <\\|assistant\\|>"):
            list(chat.stream("no chat format here"))
        with pytest.raises(RemoteError, match="reads at most"):
            list(chat.stream(prompt="word " * 2000))
        invalid = grpcclient.InferInput("prompt", [1], "BYTES")
        invalid.set_data_from_numpy(np.array([b"\xff\xfe"], dtype=np.object_))
        assert "not UTF-8" in raw_stream_error(grpc_url, [invalid])
        prompt = grpcclient.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
        assert "temperature" in raw_stream_error(grpc_url, [prompt], {"temperature": -2.0})
        assert "unknown parameter 'max_length'" in raw_stream_error(grpc_url, [prompt], {"max_length": 3})
        assert "stream_interval_ms" in raw_stream_error(grpc_url, [prompt], {"stream_interval_ms": -1})
        assert "exactly one" in raw_stream_error(grpc_url, [])
        # Still serving, every model.
        assert "".join(chat.stream(prompt="Still there?", max_new_tokens=8))
    with ScoreClient(f"{grpc_url}/rm") as rm:
        assert len(rm.score(["<|prompter|>a<|endoftext|><|assistant|>b<|endoftext|>"])) == 1


def raw_stream_error(url: str, inputs: list, parameters: dict | None = None) -> str:
    """The error a raw tritonclient stream gets for a request that skips ChatClient's own checks."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    answers: list = []
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    client.async_stream_infer("policy", inputs, parameters=parameters, enable_empty_final_response=True)
    deadline = time.monotonic() + 10
    while not answers and time.monotonic() < deadline:
        time.sleep(0.01)
    client.stop_stream(cancel_requests=True)
    client.close()
    assert answers and answers[0][1] is not None, answers
    return str(answers[0][1])


def test_unavailable_server_or_model_is_a_clear_error(grpc_url: str) -> None:
    (port,) = free_ports(1)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match=f"127.0.0.1:{port}/rm"):
        ScoreClient(f"127.0.0.1:{port}/rm", timeout=5, retries=2).score(["x"])
    assert time.monotonic() - started < 10  # two short retries, then the error
    with pytest.raises(ServerUnavailable, match="nope"):
        ScoreClient(f"{grpc_url}/nope", timeout=5).score(["x"])
    with pytest.raises(ServerUnavailable, match=f"127.0.0.1:{port}/policy"):
        list(ChatClient(f"127.0.0.1:{port}", retries=1).stream(prompt="hi"))


def test_a_second_server_on_the_same_ports_exits_2_naming_the_port(server: TritonServer, repo: Path,
                                                                    tmp_path: Path) -> None:
    options = server.options
    result = run_oatui("serve", "--repo", str(repo), "--http-port", str(options.http_port), "--grpc-port",
                       str(free_ports(1)[0]), "--metrics-port", str(free_ports(1)[0]), workspace=tmp_path / "ws")
    assert result.returncode == 2
    assert result.stderr.strip() == f"oatui serve: error: --http-port {options.http_port}: port in use on 127.0.0.1"
    result = run_oatui("serve", "--repo", str(repo), "--grpc-port", str(options.grpc_port), "--http-port",
                       str(free_ports(1)[0]), "--metrics-port", str(free_ports(1)[0]), workspace=tmp_path / "ws")
    assert result.returncode == 2 and f"--grpc-port {options.grpc_port}: port in use" in result.stderr
    assert result.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Servers of their own: killed, hung, detached


def test_a_hung_or_killed_server_gives_the_client_an_error_not_a_hang(repo: Path, tmp_path: Path) -> None:
    workspace = Workspace.open(tmp_path / "ws")
    before = shm_files()
    server = TritonServer(workspace, options_for(repo, models=("policy",)))
    server.start()
    try:
        url = server.info().grpc_url
        ours = server.info().shm
        assert ours and set(ours) <= shm_files() - before
        stubs = [child.pid for child in server._children]
        assert stubs
        with ChatClient(url, timeout=2.0) as client:
            # Hung: the server stops answering mid-answer; the piece timeout ends the wait.
            stream = client.stream(prompt="A long story, please.", max_new_tokens=480, ignore_eos=True)
            next(stream)
            os.kill(server.pid, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(ServerUnavailable, match="no answer for 2 s"):
                list(stream)
            assert time.monotonic() - started < 4
            os.kill(server.pid, signal.SIGCONT)
            # Killed mid-answer: the broken connection is an error at once.
            stream = client.stream(prompt="Another long story.", max_new_tokens=480, ignore_eos=True)
            next(stream)
            os.kill(server.pid, signal.SIGSTOP)
            os.kill(server.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(ServerUnavailable, match="127.0.0.1"):
                list(stream)
            assert time.monotonic() - started < 2.5
    finally:
        server.stop()
    assert not alive(server.pid)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in stubs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in stubs)
    assert not set(ours) & shm_files(), "the killed server's shared memory was removed"


def test_a_dead_engine_ends_its_requests_with_an_error_not_a_hang(repo: Path, tmp_path: Path) -> None:
    """The policy's decode loop runs in an engine process under the backend's stub: if it dies, the
    request in flight ends with an error naming its exit, and later ones are refused at once."""
    workspace = Workspace.open(tmp_path / "ws")
    server = TritonServer(workspace, options_for(repo, models=("policy",)))
    server.start()
    try:
        engines = [child for child in server._children if "oatui.serve.engine" in " ".join(child.cmdline())]
        assert len(engines) == 1 and engines[0].parent().pid in {child.pid for child in server._children}
        with ChatClient(server.info().grpc_url, timeout=10.0) as client:
            stream = client.stream(prompt="A long story, please.", max_new_tokens=480, ignore_eos=True)
            next(stream)
            os.kill(engines[0].pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(RemoteError, match=f"generation engine exited with code {-signal.SIGKILL}"):
                list(stream)
            assert time.monotonic() - started < 5
            with pytest.raises(RemoteError, match="generation engine is not running"):
                list(client.stream(prompt="Hi", max_new_tokens=4))
    finally:
        server.stop()


def test_detach_status_chat_stop_round_trip(repo: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    http, grpc, metrics = free_ports(3)
    ports = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    before = shm_files()
    result = run_oatui("serve", "--repo", str(repo), "--models", "policy", *ports, "--detach",
                       "--admin-key", "k3y-for-tests", workspace=workspace)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"127.0.0.1:{grpc}"
    key_file = workspace / "state" / "triton-admin-key"
    assert f"stored in {key_file}" in result.stderr and "k3y-for-tests" not in result.stderr
    try:
        status = run_oatui("serve", "--status", "--json", workspace=workspace)
        info = json.loads(status.stdout)
        assert info["grpc_url"] == f"127.0.0.1:{grpc}" and info["models"] == ["policy"]
        assert alive(info["pid"]) and alive(info["supervisor_pid"])
        assert os.getsid(info["supervisor_pid"]) == info["supervisor_pid"]  # its own session
        assert info["log"].startswith(str(workspace / "logs" / "tritonserver-"))
        assert info["shm"] and set(info["shm"]) <= shm_files() - before
        # The chat command finds the detached server by itself.
        chat = run_oatui("chat", "How do I bake bread?", "--max-new-tokens", "12", "--temperature", "0",
                         workspace=workspace)
        assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
        # Interactive: each question goes with the conversation so far.
        talk = subprocess.run([OATUI, "chat", "--workspace", str(workspace), "--max-new-tokens", "8",
                               "--temperature", "0"], input="Hi there\nAnd then?\n\n", capture_output=True,
                              text=True, timeout=120)
        assert talk.returncode == 0 and talk.stdout.count("assistant> ") == 2, (talk.stdout, talk.stderr)
        prompt_tokens = [int(m) for m in re.findall(r"(\d+) prompt tokens", Path(info["log"]).read_text())]
        assert prompt_tokens[-1] > prompt_tokens[-2] + 8  # the second carried the first turn and its answer
        # The admin key guards the repository API; inference stays open.
        index = urllib.request.Request(f"http://127.0.0.1:{http}/v2/repository/index", method="POST", data=b"{}")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(index, timeout=5)  # noqa: S310
        index.add_header("admin-key", "k3y-for-tests")
        with urllib.request.urlopen(index, timeout=5) as response:  # noqa: S310
            assert json.loads(response.read())[0]["name"] == "policy"
        assert "k3y-for-tests" not in Path(info["log"]).read_text()
        assert "k3y-for-tests" not in (workspace / "state" / "server.json").read_text()
        assert "k3y-for-tests" not in (workspace / "logs" / "serve-supervisor.log").read_text()
        again = run_oatui("serve", "--repo", str(repo), *ports, "--detach", workspace=workspace)
        assert again.returncode == 2 and "already runs" in again.stderr
    finally:
        stopped = run_oatui("serve", "--stop", workspace=workspace)
    assert stopped.returncode == 0 and f"stopped tritonserver {info['pid']}" in stopped.stderr
    assert not alive(info["pid"]) and not alive(info["supervisor_pid"])
    assert not set(info["shm"]) & shm_files()
    assert not (workspace / "state" / "server.json").exists()
    assert run_oatui("serve", "--status", workspace=workspace).stdout.strip() == "not running"
    unreachable = run_oatui("chat", "hi", "--url", f"127.0.0.1:{grpc}", workspace=workspace)
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1
    assert f"127.0.0.1:{grpc}/policy: server unavailable" in unreachable.stderr
