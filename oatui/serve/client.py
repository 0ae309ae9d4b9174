"""Clients of the served models, on tritonclient gRPC: scores, reference log-probs, streamed chat.

Every call has a timeout; connection errors (server not up yet, restarting) are retried a few
times with backoff, nothing else is. Two errors reach callers:

- :class:`ServerUnavailable`: no server at the address, the model is not there or not ready, the
  connection broke, or no answer came within the timeout;
- :class:`RemoteError`: the server answered with an error (bad input, model failure).

The UI imports this module, so it imports neither torch nor transformers; tritonclient itself is
imported when a client is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from oatui.errors import UserError

RETRY_BACKOFF = 0.25  # seconds before the first retry, doubled each time
RETRY_BACKOFF_MAX = 2.0
_request_ids = itertools.count(1)

T = TypeVar("T")


class ServerUnavailable(Exception):
    """The server or the model is not there, the connection broke, or no answer came in time."""


class RemoteError(Exception):
    """The server answered with an error."""


class ModelInterfaceError(RemoteError):
    """The served model does not take or return the tensors the client needs (an Open-Assistant
    ``to_triton`` model, say): one line naming the missing tensor."""


#: Open-Assistant's ``to_triton`` models, for the hint in :class:`ModelInterfaceError`.
_OA_TO_TRITON = ("Open-Assistant's to_triton models take INT32 input_ids/attention_mask and return rewards or "
                 "FP16 logits; only the host:port/model address is shared")


class AddressError(UserError, ValueError):
    """A malformed ``host:port/model`` address."""


@dataclass(frozen=True)
class TritonAddress:
    """A model on a server: ``host:port/model`` (Open-Assistant's TRITON_HOST_RM / TRITON_HOST_REF)."""

    host: str
    port: int
    model: str

    @classmethod
    def parse(cls, text: str, default_model: str | None = None) -> "TritonAddress":
        raw = text.strip()
        for scheme in ("grpc://", "http://"):
            if raw.startswith(scheme):
                raw = raw[len(scheme):]
        location, _, model = raw.partition("/")
        model = model.strip("/") or (default_model or "")
        if not model:
            raise AddressError(f"{text!r}: no model name (expected host:port/model)")
        if "/" in model:
            raise AddressError(f"{text!r}: the model name may not contain '/'")
        if location.startswith("["):  # [IPv6]:port
            host, _, rest = location[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
            host = f"[{host}]"
        else:
            host, _, port_text = location.rpartition(":")
        if not host or host == "[]":
            raise AddressError(f"{text!r}: expected host:port/model")
        try:
            port = int(port_text)
        except ValueError:
            raise AddressError(f"{text!r}: no port number (expected host:port/model)") from None
        if not 1 <= port <= 65535:
            raise AddressError(f"{text!r}: port {port} is out of range")
        return cls(host, port, model)

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.url}/{self.model}"


def _as_address(address: "TritonAddress | str", default_model: str | None = None) -> TritonAddress:
    return address if isinstance(address, TritonAddress) else TritonAddress.parse(address, default_model)


def _checked_url(url: str) -> str:
    """``host:port`` as given, once its port is a port: gRPC would take 99999 modulo 65536 and dial
    another port."""
    TritonAddress.parse(url, default_model="-")
    return url


def _is_local(url: str) -> bool:
    """Whether ``host:port`` names this machine's loopback."""
    from oatui.serve.ports import is_loopback

    return is_loopback(url.rpartition(":")[0].strip("[]"))


#: gRPC sends even 127.0.0.1 through grpc_proxy / https_proxy / http_proxy unless no_proxy names
#: it, and no proxy reaches this machine's loopback: channels to a local server go direct.
_NO_PROXY = ("grpc.enable_http_proxy", 0)


def _triton_channel_args(url: str) -> list[tuple[str, Any]] | None:
    """tritonclient's own channel options, plus no proxy for a local server; None elsewhere
    (tritonclient's defaults, the environment's proxy settings)."""
    if not _is_local(url):
        return None
    import tritonclient.grpc as grpcclient

    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        _NO_PROXY,
    ]


# ---------------------------------------------------------------------------------------------
# Errors and retries


def _status_name(error: BaseException) -> str:
    """``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ... from a tritonclient or grpc error ('' if none)."""
    status = None
    if hasattr(error, "status"):
        status = error.status()
    elif hasattr(error, "code"):
        try:
            status = error.code()
        except Exception:  # noqa: BLE001
            status = None
    if status is None:
        return ""
    return str(status).rsplit(".", 1)[-1]


def _message(error: BaseException) -> str:
    if hasattr(error, "message") and callable(error.message):
        text = error.message()
    elif hasattr(error, "details") and callable(error.details):
        text = error.details()
    else:
        text = str(error)
    return " ".join(str(text or error).split())


def _is_connection_error(error: BaseException) -> bool:
    return _status_name(error) == "UNAVAILABLE" and not _is_restricted(error)


def _is_restricted(error: BaseException) -> bool:
    """tritonserver refused an API restricted to its admin key (gRPC says UNAVAILABLE, HTTP 403)."""
    return "is restricted" in _message(error) or "restricted header" in _message(error)


FALLBACK_MAX_BATCH = 16
"""Rows per request when the model's config cannot be read: ``oatui export``'s default ``--max-batch``."""
ADMIN_KEY_ENV = "OATUI_ADMIN_KEY"
"""The admin key of a server that restricts its APIs (``oatui serve --address``): clients send it
when asking for a model's config (its batch limit, its EOS token), which such a server restricts."""


class RestrictedAPI(RemoteError):
    """The server restricts the API to its admin key, and none (or another) was sent."""


def admin_headers() -> dict[str, str] | None:
    """gRPC metadata carrying ``$OATUI_ADMIN_KEY`` under the header tritonserver checks, or None."""
    key = os.environ.get(ADMIN_KEY_ENV, "").strip()
    return {"triton-grpc-protocol-admin-key": key} if key else None


def classify(error: BaseException, where: str, timeout: float | None = None) -> Exception:
    """The caller-facing exception for a tritonclient/grpc error at ``where`` (``host:port/model``)."""
    status = _status_name(error)
    text = _message(error)
    if _is_restricted(error):
        return RestrictedAPI(f"{where}: the server restricts this API to its admin key (${ADMIN_KEY_ENV}): {text}")
    if status == "UNAVAILABLE":
        return ServerUnavailable(f"{where}: server unavailable ({text})")
    if status == "DEADLINE_EXCEEDED":
        return ServerUnavailable(f"{where}: no answer within {timeout:g} s" if timeout else f"{where}: timed out")
    if status in ("NOT_FOUND",) or "unknown model" in text or "is not ready" in text or "is not found" in text:
        return ServerUnavailable(f"{where}: model not available ({text})")
    if status == "CANCELLED":
        return ServerUnavailable(f"{where}: the request was cancelled ({text})")
    return RemoteError(f"{where}: {text}")


def _backoff(attempt: int) -> float:
    return min(RETRY_BACKOFF * (2**attempt), RETRY_BACKOFF_MAX)


def _with_retries(call: Callable[[], T], where: str, timeout: float, retries: int) -> T:
    from tritonclient.utils import InferenceServerException

    for attempt in range(retries + 1):
        try:
            return call()
        except InferenceServerException as error:
            if _is_connection_error(error) and attempt < retries:
                time.sleep(_backoff(attempt))
                continue
            raise classify(error, where, timeout) from None
    raise AssertionError("unreachable")


class _UnaryClient:
    """What ScoreClient and RefLogprobClient share: one channel, the model's batch limit, retries,
    and a check (once, before the first request) that the model has the client's tensors."""

    #: (name, Triton datatype) of every input the client sends, the output it reads, and what it is.
    INPUTS: tuple[tuple[str, str], ...] = ()
    OUTPUT = ""
    KIND = ""
    MODE = ""

    def __init__(self, address: "TritonAddress | str", timeout: float, retries: int, default_model: str) -> None:
        import tritonclient.grpc as grpcclient

        self.address = _as_address(address, default_model)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(
            self.address.url, channel_args=_triton_channel_args(self.address.url))
        self._max_batch: int | None = None
        self._interface_checked = False

    def _call(self, call: Callable[[], T]) -> T:
        return _with_retries(call, str(self.address), self.timeout, self.retries)

    def max_batch_size(self) -> int:
        """The model's ``max_batch_size`` (0: no batch dimension), asked once."""
        if self._max_batch is None:
            try:
                config = self._call(lambda: self._client.get_model_config(
                    self.address.model, as_json=True, client_timeout=self.timeout, headers=admin_headers()))
                self._max_batch = int(config.get("config", config).get("max_batch_size", 0) or 0)
            except RestrictedAPI:
                # An exposed server without the key: chunks of export's default batch limit.
                self._max_batch = FALLBACK_MAX_BATCH
        return self._max_batch

    def check_interface(self) -> None:
        """Raise :class:`ModelInterfaceError` naming the first input or output tensor the served model
        lacks (or has with another datatype); asked of the server once."""
        if self._interface_checked:
            return
        metadata = self._call(lambda: self._client.get_model_metadata(
            self.address.model, as_json=True, client_timeout=self.timeout))
        inputs = {t.get("name"): t.get("datatype") for t in metadata.get("inputs", [])}
        outputs = {t.get("name"): t.get("datatype") for t in metadata.get("outputs", [])}
        has = ("it has inputs " + (", ".join(f"{n} {d}" for n, d in inputs.items()) or "none")
               + " and outputs " + (", ".join(f"{n} {d}" for n, d in outputs.items()) or "none"))
        wanted = (f"oatui's {self.KIND} takes " + ", ".join(f"{n} {d}" for n, d in self.INPUTS)
                  + f" and returns {self.OUTPUT} (oatui export --mode {self.MODE}); "
                  + _OA_TO_TRITON)
        problem = next((f"no input tensor '{name}'" for name, _ in self.INPUTS if name not in inputs), None)
        if problem is None and self.OUTPUT not in outputs:
            problem = f"no output tensor '{self.OUTPUT}'"
        if problem is None:
            problem = next((f"input tensor '{name}' is {inputs[name]}, not {datatype}"
                            for name, datatype in self.INPUTS if inputs[name] != datatype), None)
        if problem is not None:
            raise ModelInterfaceError(f"{self.address}: {problem}: {has}; {wanted}")
        self._interface_checked = True

    def _infer(self, inputs: list[Any], output: str) -> np.ndarray:
        self.check_interface()
        outputs = [self._grpc.InferRequestedOutput(output)]
        result = self._call(lambda: self._client.infer(
            self.address.model, inputs, outputs=outputs, client_timeout=self.timeout))
        array = result.as_numpy(output)
        if array is None:
            raise RemoteError(f"{self.address}: the answer has no '{output}' output")
        return array

    def _chunks(self, rows: int) -> Iterator[slice]:
        size = self.max_batch_size() or rows
        for start in range(0, rows, size):
            yield slice(start, min(rows, start + size))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            # Dropped now, while grpc is still importable (its own __del__ fails at interpreter exit).
            self._client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScoreClient(_UnaryClient):
    """Reward-model scores from a served ``rm`` model (``oatui export --mode rm``)."""

    INPUTS = (("text", "BYTES"),)
    OUTPUT = "score"
    KIND = "reward model"
    MODE = "rm"

    def __init__(self, address: "TritonAddress | str", timeout: float = 30.0, retries: int = 3) -> None:
        super().__init__(address, timeout, retries, default_model="rm")

    def score(self, texts: Sequence[str]) -> list[float]:
        """One score per conversation text (chat format, ending with the reply to judge)."""
        texts = list(texts)
        if not texts:
            return []
        scores: list[float] = []
        for part in self._chunks(len(texts)):
            batch = np.array([t.encode("utf-8") for t in texts[part]], dtype=np.object_).reshape(-1, 1)
            tensor = self._grpc.InferInput("text", list(batch.shape), "BYTES")
            tensor.set_data_from_numpy(batch)
            scores.extend(float(v) for v in self._infer([tensor], "score").reshape(-1))
        return scores


class RefLogprobClient(_UnaryClient):
    """Per-token log-probs from a served ``ref`` model (``oatui export --mode ref``)."""

    INPUTS = (("input_ids", "INT64"), ("attention_mask", "INT64"))
    OUTPUT = "logprobs"
    KIND = "reference model"
    MODE = "ref"

    def __init__(self, address: "TritonAddress | str", timeout: float = 30.0, retries: int = 3) -> None:
        super().__init__(address, timeout, retries, default_model="ref")

    def logprobs(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """``out[b, t] = log p(ids[b, t+1] | ids[b, :t+1])``: float32, B×(T−1)."""
        ids = np.ascontiguousarray(np.asarray(input_ids), dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.ascontiguousarray(np.asarray(attention_mask), dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be B×T, got shape {ids.shape}")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        if ids.shape[1] < 2:
            raise ValueError("input_ids needs at least 2 tokens per row")
        parts = []
        for part in self._chunks(ids.shape[0]):
            ids_in = self._grpc.InferInput("input_ids", list(ids[part].shape), "INT64")
            ids_in.set_data_from_numpy(ids[part])
            mask_in = self._grpc.InferInput("attention_mask", list(mask[part].shape), "INT64")
            mask_in.set_data_from_numpy(mask[part])
            parts.append(self._infer([ids_in, mask_in], "logprobs").astype(np.float32, copy=False))
        return np.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------------
# Streaming chat


def _sampling_parameters(sampling: dict[str, Any]) -> dict[str, Any]:
    """Request parameters, checked here as the server checks them; None values are left out."""
    from oatui.serve.generation import parse_request_parameters

    values = {key: value for key, value in sampling.items() if value is not None}
    try:
        parse_request_parameters(values)
    except ValueError as error:
        raise ValueError(f"sampling: {error}") from None
    return values


def _chat_inputs(text: str | None, prompt: str | None, turns: Sequence[Any] | None, system: str | None,
                 eos: Callable[[], str]) -> list[tuple[str, str]]:
    given = [name for name, value in (("text", text), ("prompt", prompt), ("turns", turns)) if value is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of text (chat format), prompt (plain text) and turns")
    inputs: list[tuple[str, str]] = []
    if turns is not None:
        from oatui.data.format import format_conversation

        text = format_conversation(list(turns), eos(), system or None, add_generation_prompt=True)
        system = None
    if text is not None:
        inputs.append(("text", text))
    else:
        assert prompt is not None
        inputs.append(("prompt", prompt))
    if system:
        inputs.append(("system", system))
    return inputs


def _is_foreign_model(message: str) -> bool:
    """The model refused oatui's own inputs: it takes Triton's LLM conventions only (a model of
    Triton's vLLM backend, say: ``oatui export --engine vllm``)."""
    return "unexpected inference input" in message and any(f"'{name}'" in message for name in ("text", "prompt", "system"))


def _llm_request(inputs: list[tuple[str, str]], parameters: dict[str, Any],
                 eos: Callable[[], str]) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """The same request in Triton's LLM conventions (its vLLM backend's): the chat text as
    ``text_input``, ``stream`` and ``exclude_input_in_output`` true, the sampling as the JSON string
    ``sampling_parameters`` with vLLM's names; ``stream_interval_ms`` stays a request parameter
    (oatui's policy reads it, the vLLM backend ignores request parameters beside that input)."""
    from oatui.data.format import SPECIAL_TOKENS, SYSTEM, format_conversation
    from oatui.serve.generation import STREAM_INTERVAL_KEY, SamplingParams

    values = dict(inputs)
    text = values.get("text")
    if text is None:
        text = format_conversation([("prompter", values["prompt"])], eos(), values.get("system") or None,
                                   add_generation_prompt=True)
    elif values.get("system"):
        text = f"{SYSTEM}{values['system']}{eos()}{text}"
    sampling: dict[str, Any] = {"max_tokens": SamplingParams().max_new_tokens}  # vLLM's default is 16
    for key, value in parameters.items():
        if key == STREAM_INTERVAL_KEY:
            continue
        if key == "max_new_tokens":
            key = "max_tokens"
        elif key == "top_k" and value == 0:
            value = -1  # vLLM's "off"
        sampling[key] = value
    sampling["stop"] = list(SPECIAL_TOKENS)  # a new turn ends the answer, as oatui's policy stops there
    llm_inputs = [("text_input", text), ("stream", True), ("exclude_input_in_output", True),
                  ("sampling_parameters", json.dumps(sampling))]
    return llm_inputs, {k: v for k, v in parameters.items() if k == STREAM_INTERVAL_KEY}


def _final(result: Any) -> bool:
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and parameters["triton_final_response"].bool_param


def _piece(result: Any) -> str | None:
    if not result.get_response().outputs:
        return None
    array = result.as_numpy("text_output")
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_CANCELLED = object()


class ChatClient:
    """Streamed answers from a served ``policy`` model, as a blocking iterator of text pieces.

    ``stream(...)`` yields pieces as they arrive; leaving the loop early (or ``close()`` on the
    iterator, or ``cancel()`` from another thread) cancels the request on the server. ``timeout``
    bounds the wait for each piece. One answer at a time per client; the gRPC stream stays open
    between answers (opening one costs milliseconds), and a cancellation closes it.
    """

    def __init__(self, url: str, model: str = "policy", timeout: float = 30.0, retries: int = 3) -> None:
        import tritonclient.grpc as grpcclient

        self.url = _checked_url(url)
        self.model = model
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._grpc = grpcclient
        self._client: Any = grpcclient.InferenceServerClient(url, channel_args=_triton_channel_args(url))
        self._lock = threading.Lock()
        self._active: queue.Queue[Any] | None = None  # where the answer in progress goes
        self._request_id: str | None = None
        self._stream_state = "closed"  # closed | open | broken (a stream error: restart before use)
        self._eos: str | None = None
        self._llm = False  # the model takes Triton's LLM conventions only

    @property
    def where(self) -> str:
        return f"{self.url}/{self.model}"

    def eos_token(self) -> str:
        """The model's EOS token (from its config), for building the chat format from turns."""
        if self._eos is None:
            try:
                config = _with_retries(
                    lambda: self._open_client().get_model_config(self.model, as_json=True, client_timeout=self.timeout,
                                                                 headers=admin_headers()),
                    self.where, self.timeout, self.retries)
            except RestrictedAPI:
                config = {}  # an exposed server without the key: the Pythia/GPT-NeoX EOS below
            parameters = config.get("config", config).get("parameters", {})
            self._eos = parameters.get("eos_token", {}).get("string_value") or "<|endoftext|>"
        return self._eos

    def stream(self, text: str | None = None, *, prompt: str | None = None, turns: Sequence[Any] | None = None,
               system: str | None = None, **sampling: Any) -> Iterator[str]:
        """Pieces of the answer to ``text`` (chat format ending with ``<|assistant|>``), ``prompt``
        (one plain message) or ``turns`` (``(role, text)`` pairs or objects with ``.role``/``.text``).

        ``sampling``: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, ignore_eos,
        stream_interval_ms.
        """
        parameters = _sampling_parameters(sampling)
        inputs = _chat_inputs(text, prompt, turns, system, self.eos_token)
        return self._stream_either(inputs, parameters)

    def _stream_either(self, inputs: list[tuple[str, str]], parameters: dict[str, Any]) -> Iterator[str]:
        """oatui's inputs, or Triton's LLM conventions for a model that takes only those (found out
        from its first refusal, then kept for this client)."""
        if not self._llm:
            received = False
            try:
                with contextlib.closing(self._stream(inputs, parameters)) as pieces:
                    for piece in pieces:
                        received = True
                        yield piece
                return
            except RemoteError as error:
                if received or not _is_foreign_model(str(error)):
                    raise
                self._llm = True
        with contextlib.closing(self._stream(*_llm_request(inputs, parameters, self.eos_token))) as pieces:
            yield from pieces

    def _open_client(self) -> Any:
        if self._client is None:
            raise RuntimeError("this ChatClient is closed")
        return self._client

    def _tensors(self, inputs: list[tuple[str, Any]]) -> list[Any]:
        tensors = []
        for name, value in inputs:
            if isinstance(value, bool):
                tensor = self._grpc.InferInput(name, [1], "BOOL")
                tensor.set_data_from_numpy(np.array([value], dtype=bool))
            else:
                tensor = self._grpc.InferInput(name, [1], "BYTES")
                tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=np.object_))
            tensors.append(tensor)
        return tensors

    def _dispatch(self, result: Any, error: Any) -> None:
        """The stream's callback (tritonclient's thread): hand the response to the answer in progress."""
        with self._lock:
            target, request_id = self._active, self._request_id
            if error is not None and _status_name(error):
                # A gRPC status (not a model's error message): the stream itself has failed.
                self._stream_state = "broken"
        if result is not None and result.get_response().id not in ("", request_id):
            return  # a late piece of an earlier, cancelled answer
        if target is not None:
            target.put((result, error))

    def _close_stream(self, cancel: bool) -> None:
        with self._lock:
            self._stream_state = "closed"
        with contextlib.suppress(Exception):  # the stream is gone either way
            self._open_client().stop_stream(cancel_requests=cancel)

    def _send(self, responses: "queue.Queue[Any]", inputs: list[tuple[str, str]], parameters: dict[str, Any]) -> None:
        """Send the request on the (re)opened stream; every outcome arrives in ``responses``."""
        from tritonclient.utils import InferenceServerException

        client = self._open_client()
        with self._lock:
            state = self._stream_state
        if state == "broken":
            self._close_stream(cancel=True)
            state = "closed"
        request_id = f"chat-{next(_request_ids)}"
        with self._lock:
            self._request_id = request_id
        try:
            if state == "closed":
                client.start_stream(callback=self._dispatch)
                with self._lock:
                    self._stream_state = "open"
            client.async_stream_infer(
                self.model,
                self._tensors(inputs),
                request_id=request_id,
                parameters=parameters or None,
                enable_empty_final_response=True,
            )
        except InferenceServerException as error:
            # The stream failed at once (connection refused...): its callback carries the reason.
            with self._lock:
                self._stream_state = "broken"
            try:
                item = responses.get(timeout=1.0)
            except queue.Empty:
                item = (None, error)
            responses.put(item)

    def _stream(self, inputs: list[tuple[str, str]], parameters: dict[str, Any]) -> Iterator[str]:
        responses: queue.Queue[Any] = queue.Queue()
        with self._lock:
            if self._active is not None:
                raise RuntimeError("this ChatClient is already streaming; use one client per concurrent stream")
            self._active = responses
        finished = False
        received = False
        attempt = 0
        try:
            self._send(responses, inputs, parameters)
            while True:
                try:
                    item = responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise ServerUnavailable(f"{self.where}: no answer for {self.timeout:g} s") from None
                if item is _CANCELLED:
                    return
                result, error = item
                if error is not None:
                    if not received and _is_connection_error(error) and attempt < self.retries:
                        # Nothing was generated yet: start over once the server is back.
                        self._close_stream(cancel=True)
                        time.sleep(_backoff(attempt))
                        while not responses.empty():  # whatever the dead stream still said
                            responses.get_nowait()
                        attempt += 1
                        self._send(responses, inputs, parameters)
                        continue
                    failure = classify(error, self.where, self.timeout)
                    if received and isinstance(failure, ServerUnavailable):
                        failure = ServerUnavailable(f"{self.where}: the connection broke mid-answer ({_message(error)})")
                    raise failure
                piece = _piece(result)
                if piece:
                    received = True
                    yield piece
                if _final(result):
                    finished = True
                    return
        finally:
            with self._lock:
                self._active = None
            if not finished:
                # Cancelling one request means cancelling the stream it travels on.
                self._close_stream(cancel=True)

    def cancel(self) -> None:
        """Cancel the answer in progress (from any thread); its iterator ends without error."""
        with self._lock:
            active = self._active
        if active is not None:
            active.put(_CANCELLED)
            self._close_stream(cancel=True)

    def close(self) -> None:
        if self._client is None:
            return
        self.cancel()
        self._close_stream(cancel=True)
        self._client.close()
        # Dropped now, while grpc is still importable (its own __del__ fails at interpreter exit).
        self._client = None

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncChatClient:
    """The asyncio form of :class:`ChatClient` (tritonclient.grpc.aio's protocol stubs).

    ``async for piece in client.stream(prompt="hi"): ...``; cancelling the task that iterates,
    closing the iterator, or ``await client.cancel()`` cancels the request on the server.
    """

    def __init__(self, url: str, model: str = "policy", timeout: float = 30.0, retries: int = 3) -> None:
        self.url = _checked_url(url)
        self.model = model
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._channel: Any = None
        self._stub: Any = None
        self._calls: set[Any] = set()
        self._eos: str | None = None
        self._llm = False  # the model takes Triton's LLM conventions only

    @property
    def where(self) -> str:
        return f"{self.url}/{self.model}"

    def _ensure_channel(self) -> Any:
        if self._stub is None:
            import grpc
            from tritonclient.grpc import service_pb2_grpc

            self._channel = grpc.aio.insecure_channel(self.url, options=[_NO_PROXY] if _is_local(self.url) else None)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def _unary(self, make_call: Callable[[], Any]) -> Any:
        import grpc

        for attempt in range(self.retries + 1):
            try:
                return await make_call()
            except grpc.aio.AioRpcError as error:
                if _is_connection_error(error) and attempt < self.retries:
                    await asyncio.sleep(_backoff(attempt))
                    continue
                raise classify(error, self.where, self.timeout) from None
        raise AssertionError("unreachable")

    async def eos_token(self) -> str:
        if self._eos is None:
            from tritonclient.grpc import service_pb2

            stub = self._ensure_channel()
            headers = admin_headers()
            try:
                response = await self._unary(lambda: stub.ModelConfig(
                    service_pb2.ModelConfigRequest(name=self.model), timeout=self.timeout,
                    metadata=tuple(headers.items()) if headers else None))
                parameter = response.config.parameters.get("eos_token")
            except RestrictedAPI:
                parameter = None  # an exposed server without the key: the Pythia/GPT-NeoX EOS below
            self._eos = (parameter.string_value if parameter is not None else "") or "<|endoftext|>"
        return self._eos

    def _request(self, inputs: list[tuple[str, str]], parameters: dict[str, Any]) -> Any:
        from tritonclient.grpc import service_pb2
        from tritonclient.utils import serialize_byte_tensor

        request = service_pb2.ModelInferRequest(model_name=self.model, id=f"chat-{next(_request_ids)}")
        for name, value in inputs:
            tensor = request.inputs.add()
            tensor.name = name
            tensor.shape.extend([1])
            if isinstance(value, bool):
                tensor.datatype = "BOOL"
                request.raw_input_contents.append(np.array([value], dtype=bool).tobytes())
            else:
                tensor.datatype = "BYTES"
                request.raw_input_contents.append(
                    serialize_byte_tensor(np.array([value.encode("utf-8")], dtype=np.object_)).item())
        for key, value in parameters.items():
            if isinstance(value, bool):
                request.parameters[key].bool_param = value
            elif isinstance(value, int):
                request.parameters[key].int64_param = value
            elif isinstance(value, float):
                request.parameters[key].double_param = value
            else:
                request.parameters[key].string_param = str(value)
        # The server then ends every stream with an empty response flagged final.
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        return request

    async def stream(self, text: str | None = None, *, prompt: str | None = None, turns: Sequence[Any] | None = None,
                     system: str | None = None, **sampling: Any) -> AsyncIterator[str]:
        """Pieces of the answer, as :meth:`ChatClient.stream` (oatui's inputs, or Triton's LLM
        conventions for a model that takes only those)."""
        parameters = _sampling_parameters(sampling)
        eos = await self.eos_token() if turns is not None or self._llm else ""
        inputs = _chat_inputs(text, prompt, turns, system, lambda: eos)
        if not self._llm:
            received = False
            try:
                async with contextlib.aclosing(self._stream(self._request(inputs, parameters))) as pieces:
                    async for piece in pieces:
                        received = True
                        yield piece
                return
            except RemoteError as error:
                if received or not _is_foreign_model(str(error)):
                    raise
                self._llm = True
                eos = await self.eos_token()
        async with contextlib.aclosing(self._stream(self._request(*_llm_request(inputs, parameters, lambda: eos)))) as pieces:
            async for piece in pieces:
                yield piece

    async def _stream(self, request: Any) -> AsyncIterator[str]:
        import grpc
        from tritonclient.grpc import InferResult

        stub = self._ensure_channel()
        received = False
        for attempt in range(self.retries + 1):
            call = stub.ModelStreamInfer(iter([request]))
            self._calls.add(call)
            finished = False
            try:
                while True:
                    try:
                        # asyncio.timeout, not wait_for: wait_for may swallow a cancellation on 3.11.
                        async with asyncio.timeout(self.timeout):
                            response = await call.read()
                    except TimeoutError:
                        raise ServerUnavailable(f"{self.where}: no answer for {self.timeout:g} s") from None
                    if response is grpc.aio.EOF:
                        if received:
                            raise ServerUnavailable(f"{self.where}: the stream ended before the final response")
                        raise ServerUnavailable(f"{self.where}: the server closed the stream without an answer")
                    if response.error_message:
                        raise RemoteError(f"{self.where}: {' '.join(response.error_message.split())}")
                    result = InferResult(response.infer_response)
                    piece = _piece(result)
                    if piece:
                        received = True
                        yield piece
                    if _final(result):
                        finished = True
                        return
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.CANCELLED and call.cancelled():
                    return  # cancel() was called
                if not received and _is_connection_error(error) and attempt < self.retries:
                    await asyncio.sleep(_backoff(attempt))
                    continue
                if received and _is_connection_error(error):
                    raise ServerUnavailable(f"{self.where}: the connection broke mid-answer ({_message(error)})") from None
                raise classify(error, self.where, self.timeout) from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the caller's task is being cancelled (Esc): let it
                return  # cancel() was called: the answer just ends
            finally:
                self._calls.discard(call)
                if not finished:
                    call.cancel()

    async def cancel(self) -> None:
        """Cancel every stream of this client in progress."""
        for call in list(self._calls):
            call.cancel()

    async def close(self) -> None:
        await self.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> "AsyncChatClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
