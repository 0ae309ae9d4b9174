"""Triton Python-backend model: the policy, decoupled, streaming its answer as text pieces.

Inputs (each optional; exactly one of ``text``, ``prompt`` and ``text_input``):
  ``text``        BYTES [1]: a whole conversation in the chat format, ending with ``<|assistant|>``
  ``prompt``      BYTES [1]: one prompter message; the chat format is built here with the model's EOS
  ``system``      BYTES [1]: a system message, placed first (with ``text`` or ``prompt``)
  ``text_input``  BYTES [1]: any text, continued as is (Triton's LLM convention, as its vLLM backend)
  ``stream``      BOOL [1]: true = one response per piece, false = one response with the whole text
                  (default: true for ``text``/``prompt``, false for ``text_input``, as vLLM's)
  ``sampling_parameters``  BYTES [1]: a JSON object of parameters (below), vLLM's names accepted
  ``exclude_input_in_output``  BOOL [1]: false puts the input text before the answer (vLLM's
                  default when not streaming ``text_input``)
Parameters (request parameters or ``sampling_parameters``, all optional): ``max_new_tokens`` or
``max_tokens`` (int), ``temperature`` (float, 0 = greedy), ``top_p`` (float), ``top_k`` (int, 0 or
-1 = off), ``repetition_penalty`` (float), ``seed`` (int), ``ignore_eos`` (bool: always generate
``max_new_tokens``), ``stream_interval_ms`` (float: pieces coming sooner than this after the
previous response are grouped; 0 = one each; not given: 10, longer while more than two requests
run, see below), ``stream`` (bool, when no ``stream`` input).
Output: ``text_output`` (BYTES [1]). Streaming: one response per decoded piece or small group of
pieces (the first at once; a multi-byte character split over tokens waits for its last byte), the
last one flagged ``TRITONSERVER_RESPONSE_COMPLETE_FINAL`` as the vLLM backend flags its last (an
empty response flagged final when nothing is left to send, as after a cancel); not streaming: one
response with the whole text, flagged final.

Requests that overlap in time are decoded together (``BatchedGenerator``: a new request is
prefilled and joins the running batch at the next step; ``execute`` only queues). The decode loop
and the model run in a process of their own (:mod:`oatui.serve.engine`), so that this process's
threads, which share one interpreter lock, never hold up a decode step; this one tokenizes, turns
the tokens each step sends back into text, and talks to the server. At most ``max_batch_rows``
rows and ``max_tokens_in_flight`` reserved cache positions (config parameters); requests beyond
wait in a queue, shown by the ``oatui_queued_requests`` gauge. One thread (the engine client's
reader) takes each step's tokens, and sends the responses, each request's end (metrics, log line,
final flag) and the gauges to the server, in order: each is a round trip to the server.
Cancellation is checked between tokens: the same thread asks the server about each running
request every 10 ms (each check is a round trip) and tells the engine, which drops the request
before its next step. (A request's final response frees it in the server, so its checks and its
final must come from one thread.) Those checks and the responses of
requests that leave ``stream_interval_ms`` to the server share a budget of round trips per second
(``ROUND_TRIPS_PER_SECOND`` in ``oatui.serve.generation``): past two running requests, each one's
checks and responses are spaced further apart (40 ms at 8), so a large batch of a small model
does not spend its time on them. The gauges and the generated-tokens counter are updated at most
every 0.1 s while requests run (the counter before the final response of the request that ends
last, of a cancelled one and of a failed one, so it is exact once the batch drains; a complete
answer is not asked about cancellation at its end). Generation ends at EOS
or a role marker, at ``max_new_tokens``, or at the context length.

Written into a model repository by ``oatui export --mode policy``.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from oatui.data.format import ASSISTANT, SYSTEM, format_conversation
from oatui.serve.engine import EngineClient, EngineError, EngineSettings
from oatui.serve.generation import (
    DEFAULT_STREAM_INTERVAL_MS,
    IncrementalDecoder,
    ThrottledCheck,
    parse_request_parameters,
    spacing,
    translate_llm_parameters,
)
from oatui.serve.triton_models.common import (
    MAX_BATCH_ROWS_KEY,
    MAX_TOKENS_IN_FLIGHT_KEY,
    BadRequest,
    config_parameter,
    decode_texts,
    error_response,
    read_settings,
    request_parameters,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_INTERVAL = 0.010  # seconds between is_cancelled() round trips to the server (at most 2 running)
GAUGE_INTERVAL = 0.1  # seconds between updates of the queue and batch gauges (each set is a round trip)
DEFAULT_MAX_BATCH_ROWS = 16
DEFAULT_MAX_TOKENS_IN_FLIGHT = 32768


def _text_output(text: str) -> "pb_utils.InferenceResponse":
    output = pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))
    return pb_utils.InferenceResponse([output])


def _bool_input(request: "pb_utils.InferenceRequest", name: str) -> bool | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise BadRequest(f"input '{name}' must hold one boolean, got {values.size}")
    return bool(values[0])


class _Answer:
    """One request's answer on its way out: decoding, grouping pieces, the final response.

    ``on_token`` and ``on_end`` run on the engine client's reader thread: they decode, decide and
    send (responses, metrics, the log line) while the engine goes on with its next steps.
    """

    def __init__(self, model: "TritonPythonModel", rid: int, request: "pb_utils.InferenceRequest",
                 prompt_tokens: int, stream: bool, interval: float | None, prefix: str) -> None:
        self.model = model
        self.rid = rid
        self.request = request  # kept alive until the answer is done
        self.sender = request.get_response_sender()
        self.prompt_tokens = prompt_tokens
        self.stream = stream
        self.interval = interval  # None: the default, spaced by the batch's size
        self.decoder = IncrementalDecoder(model.tokenizer)
        self.pending: list[str] = [prefix] if prefix else []
        self.last_sent: float | None = None
        self.tokens = 0
        self.started = time.perf_counter()
        self.cancelled = ThrottledCheck(self.sender.is_cancelled, CANCEL_CHECK_INTERVAL)
        self.stopping = False  # the engine was told to drop it
        self.failed: BaseException | None = None  # a response the server refused

    def stop(self) -> None:
        """The client cancelled, or a response failed: the engine drops the request before its next
        step and reports it ended."""
        if not self.stopping:
            self.stopping = True
            self.model.engine.cancel(self.rid)

    def on_token(self, token: int) -> None:
        self.tokens += 1
        if self.failed is not None:
            return  # e.g. the client went away: the engine is dropping it, the others go on
        # Tokens are decoded only when a response is due: one decode per response, not per token.
        self.decoder.add(token)
        if not self.stream:
            return
        now = time.perf_counter()
        interval = self.interval
        if interval is None:
            interval = spacing(DEFAULT_STREAM_INTERVAL_MS / 1000, self.model.running)
        if self.last_sent is None or now - self.last_sent >= interval:
            piece = self.decoder.take()
            if not piece:
                return
            self.pending.append(piece)
            self._send("".join(self.pending))
            self.pending.clear()
            self.last_sent = now

    def _send(self, text: str) -> None:
        try:
            self.sender.send(_text_output(text))
        except Exception as error:  # noqa: BLE001 - this request ends with the error, the others go on
            self.failed = error
            self.stop()

    def on_end(self, reason: str, error: BaseException | None) -> None:
        if self.failed is not None:
            reason, error = "error", self.failed
        seconds = time.perf_counter() - self.started
        rest = "" if reason in ("error", "cancelled") else "".join([*self.pending, self.decoder.flush()])
        last = not self.model.answers  # the others have ended (this one is out already)
        tokens = self.model.take_tokens(self.tokens, now=last or reason in ("error", "cancelled"))
        self._end(reason, error, seconds, rest, tokens)

    def _end(self, reason: str, error: BaseException | None, seconds: float, text: str, tokens: int) -> None:
        """The end of the answer: metrics, log line, what is left, final flag.

        ``tokens``: generated tokens to add to the counter before the final response (this request's
        and those of requests that ended before it without being counted; see ``take_tokens``).
        """
        model = self.model
        with model.lock:
            model.watching.discard(self)  # no check after the final response
        if tokens:
            model.tokens_metric.increment(tokens)
        name = model.settings.name
        if reason == "error":
            pb_utils.Logger.log_error(f"oatui policy {name}: generation failed: {error!r}")
            try:
                self.sender.send(error_response(f"generation failed: {error}", internal=True), flags=FINAL)
            except Exception:  # noqa: BLE001 - the client may be gone; nothing waits for it
                pass
            return
        cancelled = reason == "cancelled"
        if cancelled:
            model.cancelled_metric.increment(1)
        pb_utils.Logger.log_info(
            f"oatui policy {name}: request {self.request.request_id() or '-'}: {self.prompt_tokens} prompt tokens, "
            f"{self.tokens} generated in {seconds:.3f} s{' (cancelled)' if cancelled else ''}"
        )
        try:
            if cancelled:
                self.sender.send(flags=FINAL)
                return
            if not self.stream:
                self.sender.send(_text_output(text), flags=FINAL)
                return
            if text:
                self.sender.send(_text_output(text), flags=FINAL)  # one round trip, not two
            else:
                self.sender.send(flags=FINAL)
        except Exception:  # noqa: BLE001 - a cancelled request may refuse the final flag; nothing waits for it
            pass


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from oatui.models.loading import load_tokenizer

        settings = read_settings(args)
        self.settings = settings
        config = json.loads(args["model_config"])
        max_rows = int(config_parameter(config, MAX_BATCH_ROWS_KEY, str(DEFAULT_MAX_BATCH_ROWS)) or DEFAULT_MAX_BATCH_ROWS)
        max_tokens = int(config_parameter(config, MAX_TOKENS_IN_FLIGHT_KEY, str(DEFAULT_MAX_TOKENS_IN_FLIGHT))
                         or DEFAULT_MAX_TOKENS_IN_FLIGHT)
        # The engine loads the model while this process loads the tokenizer.
        self.engine = EngineClient(
            EngineSettings(settings.model_path, settings.device, args.get("model_instance_device_id") or None,
                           settings.dtype, settings.cpu_threads, max_rows, max_tokens),
            self._on_step, self._on_engine_exit, name=f"oatui-policy-{settings.name}", tick=self._check_cancelled,
            on_error=self._io_failed)
        try:
            self.tokenizer = load_tokenizer(settings.model_path)
        except BaseException:
            self.engine.abandon()
            raise
        self.eos = self.tokenizer.eos_token
        labels = {"model": settings.name}
        # Metrics on the metrics endpoint: what the server actually generated, cancellations
        # included, and the batch. A family must outlive its metrics, so both stay referenced here.
        family = pb_utils.MetricFamily
        self.metric_families = [
            family(name="oatui_generated_tokens_total", description="Tokens generated by the oatui policy model",
                   kind=family.COUNTER),
            family(name="oatui_cancelled_requests_total",
                   description="Generation requests the client cancelled before the end", kind=family.COUNTER),
            family(name="oatui_queued_requests", description="Generation requests waiting for room in the batch",
                   kind=family.GAUGE),
            family(name="oatui_running_requests", description="Generation requests in the running batch",
                   kind=family.GAUGE),
        ]
        self.tokens_metric = self.metric_families[0].Metric(labels=labels)
        self.cancelled_metric = self.metric_families[1].Metric(labels=labels)
        self.queued_metric = self.metric_families[2].Metric(labels=labels)
        self.running_metric = self.metric_families[3].Metric(labels=labels)
        self.gauges = (-1, -1)
        self.gauges_set = 0.0
        self.tokens_uncounted = 0  # generated tokens not yet added to tokens_metric (the reader thread)
        self.tokens_counted = 0.0  # when they last were
        self.watching: set[_Answer] = set()  # requests whose cancellation the reader thread checks
        # Requests submitted and not ended, by id, for the engine's events (the lock: execute's thread
        # adds, the reader thread removes).
        self.answers: dict[int, _Answer] = {}
        self.lock = threading.Lock()
        self.next_rid = 0
        self.queued = self.running = 0  # as the engine's last step left them
        self.engine_gone = False
        self.engine.wait_ready()
        self.limit, self.device = self.engine.limit, self.engine.device
        pb_utils.Logger.log_info(
            f"oatui policy {settings.name}: {settings.model_path} on {self.device}, context {self.limit} tokens, "
            f"batches of up to {max_rows} requests and {max_tokens} tokens in flight"
        )

    def _on_step(self, events: list[tuple], queued: int, running: int) -> None:
        """On the engine's reader thread, after each step: its tokens and ends, then the gauges."""
        self.queued, self.running = queued, running
        for event in events:
            answer = self.answers[event[0]]
            try:
                if len(event) == 2:
                    answer.on_token(event[1])
                    continue
                with self.lock:
                    del self.answers[event[0]]
                answer.on_end(event[1], None if event[2] is None else RuntimeError(event[2]))
            except Exception as error:  # noqa: BLE001 - this request's trouble; the others' events go on
                self._io_failed(error)
                if len(event) == 2 and answer.failed is None:
                    answer.failed = error  # it ends with the error
                    answer.stop()
        self._update_gauges()

    def _on_engine_exit(self, message: str) -> None:
        """On the reader thread: the engine died; every request still open ends with its error."""
        pb_utils.Logger.log_error(f"oatui policy {self.settings.name}: {message}")
        self.queued = self.running = 0
        with self.lock:
            self.engine_gone = True  # later requests are refused (and never watched)
            answers = list(self.answers.values())
            self.answers.clear()
        for answer in answers:
            answer.on_end("error", RuntimeError(message))
        self._update_gauges()

    def _update_gauges(self) -> None:
        """After each step: the gauges, when they changed, at most every GAUGE_INTERVAL while the
        batch runs (a set is a round trip to the server) and at once when the model goes idle; the
        same for tokens not yet counted."""
        values = (self.queued, self.running)
        now = time.perf_counter()
        if self.tokens_uncounted and (values == (0, 0) or now - self.tokens_counted >= GAUGE_INTERVAL):
            self.tokens_metric.increment(self.take_tokens(0, now=True))
        if values == self.gauges:
            return
        if values == (0, 0) or now - self.gauges_set >= GAUGE_INTERVAL:
            self.gauges, self.gauges_set = values, now
            self._set_gauges(values)

    def take_tokens(self, tokens: int, now: bool) -> int:
        """On the engine's reader thread: add ``tokens`` to those not yet counted and return how many to
        count now: all of them when ``now`` or GAUGE_INTERVAL after the last count, else 0.

        Each increment is a round trip to the server, so while a batch runs the counter is updated
        at most every GAUGE_INTERVAL; the request that ends last, a cancelled one and a failed one
        take every token still uncounted with them, before their final response.
        """
        self.tokens_uncounted += tokens
        clock = time.perf_counter()
        if not now and clock - self.tokens_counted < GAUGE_INTERVAL:
            return 0
        taken, self.tokens_uncounted, self.tokens_counted = self.tokens_uncounted, 0, clock
        return taken

    def _set_gauges(self, values: tuple[int, int]) -> None:
        self.queued_metric.set(values[0])
        self.running_metric.set(values[1])

    def _check_cancelled(self) -> float | None:
        """On the reader thread: ask the server about each running request whose last check is
        10 ms old (more with more than two running); the seconds until the next one is due (None:
        no request to watch)."""
        due = None
        with self.lock:
            watching = list(self.watching)
        interval = spacing(CANCEL_CHECK_INTERVAL, len(watching))
        for answer in watching:
            check = answer.cancelled
            check.interval = interval
            try:
                if check():
                    answer.stop()
                    continue
            except Exception as error:  # noqa: BLE001 - asked again after the interval
                check.last = time.perf_counter()
                self._io_failed(error)
            assert check.last is not None
            due = check.last + check.interval if due is None else min(due, check.last + check.interval)
        return None if due is None else max(0.0, due - time.perf_counter())

    def _io_failed(self, error: BaseException) -> None:
        pb_utils.Logger.log_error(f"oatui policy {self.settings.name}: {error!r}")

    def _texts(self, request: "pb_utils.InferenceRequest") -> dict[str, str]:
        limit = self.settings.max_text_bytes
        inputs = {}
        for name in ("text", "prompt", "system", "text_input", "sampling_parameters"):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            values = decode_texts(tensor.as_numpy() if tensor is not None else None, name, limit, required=False)
            if values is not None:
                if len(values) != 1:
                    raise BadRequest(f"input '{name}' must hold one string, got {len(values)}")
                inputs[name] = values[0]
        return inputs

    def _prompt(self, inputs: dict[str, str]) -> str:
        """The text the model continues."""
        text, prompt, system, raw = (inputs.get(name) for name in ("text", "prompt", "system", "text_input"))
        if sum(value is not None for value in (text, prompt, raw)) != 1:
            raise BadRequest("give exactly one of the inputs 'text' (chat format), 'prompt' (plain text) and "
                             "'text_input' (continued as is)")
        if raw is not None:
            if system:
                raise BadRequest("input 'system' goes with 'text' or 'prompt', not with 'text_input'")
            if not raw:
                raise BadRequest("input 'text_input' is empty")
            return raw
        if prompt is not None:
            if not prompt.strip():
                raise BadRequest("input 'prompt' is empty")
            return format_conversation([("prompter", prompt)], self.eos, system or None, add_generation_prompt=True)
        assert text is not None
        if not text.endswith(ASSISTANT):
            raise BadRequest(f"input 'text' must end with {ASSISTANT} (the chat format, ready for the answer)")
        return f"{SYSTEM}{system}{self.eos}{text}" if system else text

    def _submit(self, request: "pb_utils.InferenceRequest") -> None:
        inputs = self._texts(request)
        prompt = self._prompt(inputs)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.limit:
            raise BadRequest(
                f"the conversation is {len(ids)} tokens; this model reads at most {self.limit} (prompt plus answer)"
            )
        values = request_parameters(request.parameters())
        if "sampling_parameters" in inputs:
            extra = request_parameters(inputs["sampling_parameters"])
            values.update(extra)
        values = translate_llm_parameters(values)
        stream = _bool_input(request, "stream")
        stream_parameter = values.pop("stream", None)
        if stream is None and stream_parameter is not None:
            if not isinstance(stream_parameter, bool):
                raise BadRequest(f"parameter 'stream' must be true or false, got {stream_parameter!r}")
            stream = stream_parameter
        llm_style = "text_input" in inputs
        if stream is None:
            stream = not llm_style
        exclude = _bool_input(request, "exclude_input_in_output")
        if exclude is None:
            exclude = stream or not llm_style
        params, interval = parse_request_parameters(values)
        with self.lock:
            if self.engine_gone:
                raise EngineError("the generation engine is not running (see the server log)")
            rid, self.next_rid = self.next_rid, self.next_rid + 1
            answer = _Answer(self, rid, request, len(ids), stream, interval, "" if exclude else prompt)
            self.answers[rid] = answer
            self.watching.add(answer)
        try:
            self.engine.submit(rid, ids, params)
        except EngineError:
            pass  # it has just died: its exit ends this request with the error, as the others in flight

    def execute(self, requests: list["pb_utils.InferenceRequest"]) -> None:
        # Decoupled: every answer goes through its request's response sender; execute only queues,
        # so the next requests reach the batch while these are being generated.
        for request in requests:
            try:
                self._submit(request)
            except ValueError as error:  # BadRequest is one
                request.get_response_sender().send(error_response(str(error)), flags=FINAL)
            except EngineError as error:
                request.get_response_sender().send(error_response(str(error), internal=True), flags=FINAL)
        return None

    def finalize(self) -> None:
        self.engine.close(timeout=30)  # running requests end as cancelled, their ends sent first
        # Metrics before their families.
        self.tokens_metric = self.cancelled_metric = self.queued_metric = self.running_metric = None
        self.metric_families = []
