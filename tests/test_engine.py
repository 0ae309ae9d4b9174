"""The engine process (``oatui.serve.engine``) on a real (untrained) tiny checkpoint: its answers
equal the in-process loop's, cancelling and stopping end requests, and a failed load or a dead
engine is a clear error, never a hang."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from helpers import untrained_tiny_lm
from oatui.serve.engine import EngineClient, EngineError, EngineSettings
from oatui.serve.generation import SamplingParams, generate_ids

PROMPTS = ["How do I bake bread?", "Why is the sky blue?", "Hi", "Explain recursion to a beginner, please."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = untrained_tiny_lm(96)
    path = tmp_path_factory.mktemp("engine") / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


class Collector:
    """Each request's tokens and end, as the engine's reader thread reports them."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.ends: dict[int, tuple[str, str | None]] = {}
        self.done: dict[int, threading.Event] = {}
        self.exits: list[str] = []
        self.most_running = 0

    def expect(self, rid: int) -> None:
        self.tokens[rid] = []
        self.done[rid] = threading.Event()

    def on_step(self, events: list[tuple], queued: int, running: int) -> None:
        self.most_running = max(self.most_running, running)
        for event in events:
            if len(event) == 2:
                self.tokens[event[0]].append(event[1])
            else:
                self.ends[event[0]] = (event[1], event[2])
                self.done[event[0]].set()

    def wait(self, rid: int, timeout: float = 60) -> tuple[str, str | None]:
        assert self.done[rid].wait(timeout), f"request {rid} did not end"
        return self.ends[rid]


def start(path: Path, collector: Collector) -> EngineClient:
    engine = EngineClient(EngineSettings(str(path), max_batch=8), collector.on_step, collector.exits.append)
    engine.wait_ready()
    return engine


def test_engine_answers_equal_the_in_process_loop(checkpoint) -> None:  # noqa: ANN001
    path, model, tokenizer = checkpoint
    collector = Collector()
    engine = start(path, collector)
    try:
        assert engine.limit == 96 and engine.device == "cpu"
        greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
        seeded = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=7)
        jobs = [(rid, prompt, greedy if rid % 2 == 0 else seeded) for rid, prompt in enumerate(PROMPTS)]
        for rid, prompt, params in jobs:
            collector.expect(rid)
            engine.submit(rid, tokenizer(prompt, add_special_tokens=False)["input_ids"], params)
        for rid, prompt, params in jobs:
            reason, error = collector.wait(rid)
            assert error is None and reason in ("stop", "length")
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            alone = list(generate_ids(model, ids, params, {tokenizer.eos_token_id}, len(tokenizer), 96))
            assert collector.tokens[rid] == alone, prompt
        assert collector.most_running > 1  # decoded together
    finally:
        engine.close()
    assert engine.process.returncode == 0 and not collector.exits


def test_cancel_ends_one_request_and_close_ends_the_rest(checkpoint) -> None:  # noqa: ANN001
    path, _, tokenizer = checkpoint
    collector = Collector()
    engine = start(path, collector)
    long = SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    for rid in range(3):
        collector.expect(rid)
        engine.submit(rid, ids, long)
    deadline = time.monotonic() + 30
    while len(collector.tokens[0]) < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    engine.cancel(0)
    assert collector.wait(0) == ("cancelled", None)
    assert 3 <= len(collector.tokens[0]) < 60
    assert collector.wait(1) == ("length", None) and len(collector.tokens[1]) == 60
    collector.expect(3)
    collector.expect(4)
    engine.submit(3, ids, long)
    engine.submit(4, ids, long)
    while not collector.tokens[3] and time.monotonic() < deadline:
        time.sleep(0.001)
    engine.close()  # their ends arrive before close returns
    assert collector.ends[3] == ("cancelled", None) and collector.ends[4] == ("cancelled", None)
    assert engine.process.returncode == 0 and not collector.exits
    with pytest.raises(EngineError, match="not running"):
        engine.submit(5, ids, long)


def test_a_failed_load_and_a_dead_engine_are_errors_not_hangs(checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    collector = Collector()
    with pytest.raises(EngineError, match=f"cannot load {tmp_path}"):
        start(tmp_path, collector)  # no checkpoint there
    path, _, tokenizer = checkpoint
    abandoned = EngineClient(EngineSettings(str(path)), collector.on_step, collector.exits.append)
    abandoned.abandon()  # the model process's own start failed: the engine goes too
    assert abandoned.process.returncode is not None and not collector.exits
    engine = start(path, collector)
    collector.expect(0)
    engine.submit(0, tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"],
                  SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True))
    engine.process.send_signal(signal.SIGKILL)
    engine.reader.join(30)
    assert collector.exits == [f"the generation engine exited with code {-signal.SIGKILL}"]
    assert engine.process.poll() == -signal.SIGKILL
    with pytest.raises(EngineError, match="not running"):
        engine.submit(1, [1, 2, 3], SamplingParams())
    engine.close()


def test_the_reader_ticks_while_waiting_and_survives_a_failing_callback(checkpoint) -> None:  # noqa: ANN001
    path, _, tokenizer = checkpoint
    collector = Collector()
    ticks: list[float] = []
    errors: list[BaseException] = []
    waiting = [True]

    def tick() -> float | None:
        ticks.append(time.perf_counter())
        return 0.01 if waiting[0] else None  # every 10 ms with nothing coming, or wait for the next message

    def on_step(events: list[tuple], queued: int, running: int) -> None:
        if not errors:
            errors.append(RuntimeError("first"))
            raise RuntimeError("refused")  # reported; the thread goes on
        collector.on_step(events, queued, running)

    engine = EngineClient(EngineSettings(str(path)), on_step, collector.exits.append, tick=tick,
                          on_error=errors.append)
    engine.wait_ready()
    try:
        ids = tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
        collector.expect(0)
        engine.submit(0, ids, SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
        assert collector.wait(0) == ("length", None)
        assert len(collector.tokens[0]) < 6  # the first message went to the failing call
        assert [str(error) for error in errors] == ["first", "refused"]
        idle = time.perf_counter()
        time.sleep(0.1)
        spaced = [t for t in ticks if idle < t <= idle + 0.1]
        assert len(spaced) >= 2 and all(b - a >= 0.009 for a, b in zip(spaced[:-1], spaced[1:]))
        waiting[0] = False
        time.sleep(0.03)
        count = len(ticks)
        time.sleep(0.05)
        assert len(ticks) == count  # None: no tick until the next message
        collector.expect(1)
        engine.submit(1, ids, SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True))
        assert collector.wait(1) == ("length", None) and len(collector.tokens[1]) == 4
        assert len(ticks) > count
    finally:
        engine.close()
