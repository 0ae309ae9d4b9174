"""The policy's decode loop in a process of its own, driven over a socket.

Inside Triton's Python backend every thread of the model shares one interpreter lock: the thread
that takes requests, the one that sends responses and checks cancellation, and the decode loop.
Torch gives the lock up in every operator, so the others take it in the middle of each decode step
and the loop waits for them; with 8 requests in flight they held it about a tenth of the time. So
the loop runs here instead, alone in its process (the layout of vLLM's engine core, whose API
server tokenizes and detokenizes in another process): the model process keeps the tokenizer,
the text and the server's round trips, and this one keeps the model and the batch.

Protocol (pickled tuples over a socket pair, :class:`multiprocessing.connection.Connection`):

- to the engine: first ``("init", settings)`` (keys of :class:`EngineSettings`), then
  ``("submit", rid, prompt_ids, SamplingParams)``, ``("cancel", rid)`` and ``("stop",)``;
- from the engine: ``("ready", context_limit, device)`` or ``("failed", message)`` once, then after every
  step that has news ``("step", events, queued, running)``; an event is ``(rid, token)`` for a
  token or ``(rid, reason, error_text)`` for the end of a request (reasons as
  :class:`~oatui.serve.generation.GenerationRequest`'s), a request's events in order.

The engine exits when told to stop (requests still running end as cancelled) or when the socket
closes, so it never outlives the model process. ``python -m oatui.serve.engine --fd N`` is its
command line; :class:`EngineClient` starts it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from oatui.serve.generation import SamplingParams

Event = tuple[Any, ...]


@dataclass(frozen=True)
class EngineSettings:
    model_path: str
    device: str = "cpu"  # auto, cpu or cuda (see pick_device)
    device_id: str | None = None  # Triton's model_instance_device_id
    dtype: str = "float32"
    cpu_threads: int = 1
    max_batch: int = 16
    max_tokens_in_flight: int = 32768


class EngineError(RuntimeError):
    """The engine process could not start, or is gone."""


def engine_python() -> str:
    """The interpreter for the engine: this one (inside Triton's stub, the environment's python)."""
    if sys.executable:
        return sys.executable
    found = shutil.which("python3")
    if not found:
        raise EngineError("no python interpreter found to run the generation engine")
    return found


class EngineClient:
    """Starts the engine process and talks to it; ``on_step(events, queued, running)`` and
    ``on_exit(message)`` are called on a reader thread of their own.

    ``tick`` (optional) runs on that thread too, after each message and whenever the seconds it
    last returned have passed with none; it returns None to wait for the next message. What
    ``on_step`` or ``tick`` raises goes to ``on_error``, and the thread goes on.

    The constructor starts the engine loading; :meth:`wait_ready` returns once the model is loaded
    (then ``limit`` is its context length and ``device`` where it runs) or raises
    :class:`EngineError` with the engine's reason. In between the caller can load what it needs.
    """

    def __init__(self, settings: EngineSettings, on_step: Callable[[list[Event], int, int], None],
                 on_exit: Callable[[str], None], name: str = "oatui-engine", python: str | None = None,
                 tick: Callable[[], float | None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.on_step = on_step
        self.on_exit = on_exit
        self.tick = tick
        self.on_error = on_error
        self.closing = False
        self.lock = threading.Lock()  # one sender at a time (execute's thread, the reader's)
        # The engine imports the same oatui as this process, wherever that comes from.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                        env.get("PYTHONPATH")) if p)
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(  # noqa: S603 - an argv list
                [python or engine_python(), "-m", "oatui.serve.engine", "--fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True, env=env,
            )
        except OSError as error:
            ours.close()
            raise EngineError(f"cannot start the generation engine: {error.strerror}") from None
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.settings = settings
        self.name = name
        self.limit = 0
        self.device = ""
        try:
            self.conn.send(("init", asdict(settings)))
        except OSError:
            pass  # it died at once: wait_ready says how

    def wait_ready(self) -> None:
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            self.conn.close()
            raise EngineError(f"the generation engine exited with code {code} while loading "
                              f"{self.settings.model_path} (its error is in the server log)") from None
        if reply[0] != "ready":
            self.process.wait()
            self.conn.close()
            raise EngineError(reply[1])
        self.limit, self.device = reply[1], reply[2]
        self.reader = threading.Thread(target=self._read, name=f"{self.name}-reader", daemon=True)
        self.reader.start()

    def abandon(self) -> None:
        """Stop an engine that :meth:`wait_ready` never got to (the caller's own start failed)."""
        self.closing = True
        self.conn.close()  # it exits on the closed socket
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def submit(self, rid: int, prompt_ids: list[int], params: SamplingParams) -> None:
        self._send(("submit", rid, prompt_ids, params))

    def cancel(self, rid: int) -> None:
        """Ask the engine to end ``rid`` before its next step (its end event says ``cancelled``)."""
        try:
            self._send(("cancel", rid))
        except EngineError:
            pass  # gone: every request has ended with the engine's error

    def _send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                raise EngineError("the generation engine is not running") from None

    def _read(self) -> None:
        wait: float | None = None
        while True:
            try:
                if not self.conn.poll(wait):
                    wait = self._guarded(self.tick)
                    continue
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "step":
                self._guarded(self.on_step, message[1], message[2], message[3])
            wait = self._guarded(self.tick)
        code = self.process.wait()
        if not self.closing:
            self.on_exit(f"the generation engine exited with code {code}")

    def _guarded(self, call: Callable[..., Any] | None, *args: Any) -> Any:
        if call is None:
            return None
        try:
            return call(*args)
        except Exception as error:  # noqa: BLE001 - one failed call must not stop the thread
            if self.on_error is not None:
                try:
                    self.on_error(error)
                except Exception:  # noqa: BLE001
                    pass
            return None

    def close(self, timeout: float = 30) -> None:
        """Stop the engine: running requests end as cancelled (their events come first)."""
        self.closing = True
        try:
            self._send(("stop",))
        except EngineError:
            pass
        self.reader.join(timeout)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()


# -- the engine process ---------------------------------------------------------------------------


def serve(conn: Connection) -> None:
    """Load the model the first message names, then step the batch until told to stop."""
    from oatui.models.loading import load_for_inference
    from oatui.serve.generation import BatchedGenerator, GenerationRequest, context_limit, stop_token_ids
    from oatui.serve.triton_models.common import configure_threads, pick_device

    kind, values = conn.recv()
    assert kind == "init", kind
    settings = EngineSettings(**values)
    try:
        device = pick_device(settings.device, settings.device_id)
        configure_threads(device, settings.cpu_threads)
        model, tokenizer = load_for_inference(settings.model_path, "policy", device, settings.dtype)
        limit = context_limit(model, tokenizer)
        generator = BatchedGenerator(model, stop_token_ids(tokenizer), len(tokenizer), limit,
                                     max_batch=settings.max_batch, max_tokens_in_flight=settings.max_tokens_in_flight)
    except Exception as error:  # noqa: BLE001 - the model process reports it as the load's failure
        conn.send(("failed", f"cannot load {settings.model_path}: {error}"))
        return
    conn.send(("ready", limit, device))

    events: list[Event] = []
    live: set[int] = set()
    cancelled: set[int] = set()

    def request(rid: int, prompt_ids: list[int], params: SamplingParams) -> GenerationRequest:
        def on_token(token: int) -> None:
            events.append((rid, token))

        def on_end(reason: str, error: BaseException | None) -> None:
            live.discard(rid)
            cancelled.discard(rid)
            events.append((rid, reason, None if error is None else str(error) or type(error).__name__))

        live.add(rid)
        return GenerationRequest(prompt_ids, params, on_token, on_end, lambda: rid in cancelled)

    gauges = (0, 0)

    def send() -> bool:
        """The events so far and the gauges, when there is news; False when nobody listens."""
        nonlocal events, gauges
        values = (generator.queued, len(generator.running))
        if events or values != gauges:
            try:
                conn.send(("step", events, *values))
            except OSError:
                return False
            events = []
            gauges = values
        return True

    def admitted() -> None:
        if events:
            send()  # the newcomers' first tokens, before the step

    stopping = False
    while not stopping:
        idle = not generator.waiting and not generator.running
        try:
            while idle or conn.poll():
                message = conn.recv()
                idle = False
                if message[0] == "submit":
                    generator.submit(request(*message[1:]))
                elif message[0] == "cancel":
                    if message[1] in live:
                        cancelled.add(message[1])
                elif message[0] == "stop":
                    stopping = True
                    break
        except (EOFError, OSError):
            return  # the model process is gone: nobody to answer
        if stopping:
            generator.cancel_all()
        else:
            generator.step(admitted)
        if not send():
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oatui.serve.engine",
                                     description="The policy's decode loop, driven by the Triton model over a socket.")
    parser.add_argument("--fd", type=int, required=True, help="the socket inherited from the model process")
    args = parser.parse_args(argv)
    conn = Connection(args.fd)
    try:
        serve(conn)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
