"""Clients of the served models, on tritonclient gRPC: scores, reference log-probs, streamed chat.

Every call has a timeout; connection errors (server not up yet, restarting) are retried a few
times with backoff, nothing else is: one :class:`RetryPolicy` for every client (and, with its own
attempts and backoff, for the RL stage's scoring). Two errors reach callers:

- :class:`ServerUnavailable`: no server at the address (:class:`ServerUnreachable`), the model is
  not there or not ready, the connection broke, or no answer came within the timeout;
- :class:`RemoteError`: the server answered with an error (bad input, model failure).

Streamed chat has one core, :class:`AsyncChatClient` (on grpc.aio); :class:`ChatClient` is the
same client for blocking code, running it on an event loop of its own thread.

The UI imports this module, so it imports neither torch nor transformers; tritonclient itself is
imported when a client is made.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from oatui.data.format import SPECIAL_TOKENS, SYSTEM, format_conversation
from oatui.errors import UserError
from oatui.serve.generation import STREAM_INTERVAL_KEY, SamplingParams, parse_request_parameters
from oatui.serve.ports import is_loopback

RETRY_BACKOFF = 0.25  # seconds before the first retry, doubled each time
RETRY_BACKOFF_MAX = 2.0
_request_ids = itertools.count(1)

T = TypeVar("T")


class ServerUnavailable(Exception):
    """The server or the model is not there, the connection broke, or no answer came in time."""


class ServerUnreachable(ServerUnavailable):
    """No server answers at the address (not up yet, restarting, gone): what clients retry."""


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
        return ServerUnreachable(f"{where}: server unavailable ({text})")
    if status == "DEADLINE_EXCEEDED":
        return ServerUnavailable(f"{where}: no answer within {timeout:g} s" if timeout else f"{where}: timed out")
    if status in ("NOT_FOUND",) or "unknown model" in text or "is not ready" in text or "is not found" in text:
        return ServerUnavailable(f"{where}: model not available ({text})")
    if status == "CANCELLED":
        return ServerUnavailable(f"{where}: the request was cancelled ({text})")
    return RemoteError(f"{where}: {text}")


def _failure(error: BaseException, where: str, timeout: float | None = None) -> Exception | None:
    """What a caller gets for ``error``: oatui's own client errors as they are, a tritonclient or gRPC
    error classified; None for anything else (raised as it is)."""
    if isinstance(error, (ServerUnavailable, RemoteError)):
        return error
    import grpc
    from tritonclient.utils import InferenceServerException

    if isinstance(error, (InferenceServerException, grpc.RpcError)):
        return classify(error, where, timeout)
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """When a call to a server is tried again, for every client here and the RL stage's scoring.

    ``attempts`` tries in all; before try n+1 it waits ``first``·2ⁿ s, at most ``cap`` s. Only a
    failure (as :func:`classify` names it) of a ``retry_on`` type is tried again: by default a
    server that does not answer at all (not up yet, restarting). Anything the server answered
    (bad input, a failing model, a restricted API) is never retried.
    """

    attempts: int = 4
    first: float = RETRY_BACKOFF
    cap: float = RETRY_BACKOFF_MAX
    retry_on: tuple[type[Exception], ...] = (ServerUnreachable,)

    @classmethod
    def retries(cls, retries: int) -> "RetryPolicy":
        """The default policy with ``retries`` tries after the first (the clients' ``retries``)."""
        return cls(attempts=int(retries) + 1)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after try ``attempt`` (0: the first) failed."""
        return min(self.first * 2**attempt, self.cap)

    def after(self, error: BaseException, attempt: int, where: str, timeout: float | None = None) -> float:
        """Seconds to wait before trying again after ``error`` ended try ``attempt`` (from 0); raises
        what the caller gets instead when there is no other try."""
        failure = _failure(error, where, timeout)
        if failure is None:
            raise error
        if attempt + 1 < self.attempts and isinstance(failure, self.retry_on):
            return self.backoff(attempt)
        raise failure from None

    def call(self, call: Callable[[], T], where: str, timeout: float | None = None,
             sleep: Callable[[float], None] = time.sleep) -> T:
        """``call()`` under this policy; ``where`` (``host:port/model``) and ``timeout`` name the
        server in the error."""
        for attempt in itertools.count():
            try:
                return call()
            except Exception as error:  # noqa: BLE001 - after() raises what is not retried
                sleep(self.after(error, attempt, where, timeout))
        raise AssertionError("unreachable")

    async def call_async(self, call: Callable[[], Awaitable[T]], where: str, timeout: float | None = None) -> T:
        """:meth:`call` for a coroutine function, waiting with ``asyncio.sleep``."""
        for attempt in itertools.count():
            try:
                return await call()
            except Exception as error:  # noqa: BLE001 - after() raises what is not retried
                await asyncio.sleep(self.after(error, attempt, where, timeout))
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
        self.retry = RetryPolicy.retries(self.retries)
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(
            self.address.url, channel_args=_triton_channel_args(self.address.url))
        self._max_batch: int | None = None
        self._interface_checked = False

    def _call(self, call: Callable[[], T]) -> T:
        return self.retry.call(call, str(self.address), self.timeout)

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


def _infer_inputs(inputs: list[tuple[str, Any]]) -> list[Any]:
    """One-element tritonclient inputs: BOOL for a bool, BYTES (UTF-8) for a text."""
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, value in inputs:
        if isinstance(value, bool):
            tensor = grpcclient.InferInput(name, [1], "BOOL")
            tensor.set_data_from_numpy(np.array([value], dtype=bool))
        else:
            tensor = grpcclient.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=np.object_))
        tensors.append(tensor)
    return tensors


def _stream_request(model: str, inputs: list[tuple[str, Any]], parameters: dict[str, Any]) -> Any:
    """The streaming request, built as tritonclient's own ``async_stream_infer`` builds it: with
    ``enable_empty_final_response``, so that every answer ends with a response flagged final
    (tritonclient.grpc.aio's ``stream_infer`` cannot ask for it: ``triton_`` parameters are reserved)."""
    from tritonclient.grpc._utils import _get_inference_request

    request = _get_inference_request(
        model_name=model, inputs=_infer_inputs(inputs), model_version="", request_id=f"chat-{next(_request_ids)}",
        outputs=None, sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None,
        parameters=parameters or None)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


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


def _broken_mid_answer(error: Exception, where: str, timeout: float) -> Exception:
    """What the caller gets for ``error`` once pieces of the answer came: never another try."""
    failure = _failure(error, where, timeout) or error
    if failure is not error and isinstance(failure, ServerUnavailable):
        return ServerUnavailable(f"{where}: the connection broke mid-answer ({_message(error)})")
    return failure


class AsyncChatClient:
    """Streamed answers from a served ``policy`` model, as an async iterator of text pieces; the
    streaming core that :class:`ChatClient` runs on a thread of its own.

    ``async for piece in client.stream(prompt="hi"): ...``; cancelling the task that iterates,
    closing the iterator, or ``await client.cancel()`` cancels the request on the server, and with
    it the gRPC stream it travels on. ``timeout`` bounds the wait for each piece. The stream of an
    answer that ended stays open for the next answer (opening one costs milliseconds); answers
    streamed at once each have a stream of their own.
    """

    def __init__(self, url: str, model: str = "policy", timeout: float = 30.0, retries: int = 3) -> None:
        self.url = _checked_url(url)
        self.model = model
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.retry = RetryPolicy.retries(self.retries)
        self._client: Any = None  # tritonclient.grpc.aio's client, made on the event loop that uses it
        self._idle: Any = None  # the open stream of the last answer that ended, for the next one
        self._calls: set[Any] = set()  # the streams of the answers in progress
        self._eos: str | None = None
        self._llm = False  # the model takes Triton's LLM conventions only

    @property
    def where(self) -> str:
        return f"{self.url}/{self.model}"

    def _triton(self) -> Any:
        if self._client is None:
            from tritonclient.grpc.aio import InferenceServerClient

            self._client = InferenceServerClient(self.url, channel_args=_triton_channel_args(self.url))
        return self._client

    async def eos_token(self) -> str:
        """The model's EOS token (from its config), for building the chat format from turns."""
        if self._eos is None:
            client = self._triton()
            try:
                config = await self.retry.call_async(
                    lambda: client.get_model_config(self.model, as_json=True, client_timeout=self.timeout,
                                                    headers=admin_headers()),
                    self.where, self.timeout)
            except RestrictedAPI:
                config = {}  # an exposed server without the key: the Pythia/GPT-NeoX EOS below
            parameters = config.get("config", config).get("parameters", {})
            self._eos = parameters.get("eos_token", {}).get("string_value") or "<|endoftext|>"
        return self._eos

    async def stream(self, text: str | None = None, *, prompt: str | None = None, turns: Sequence[Any] | None = None,
                     system: str | None = None, **sampling: Any) -> AsyncIterator[str]:
        """Pieces of the answer to ``text`` (chat format ending with ``<|assistant|>``), ``prompt``
        (one plain message) or ``turns`` (``(role, text)`` pairs or objects with ``.role``/``.text``).

        ``sampling``: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, ignore_eos,
        stream_interval_ms.
        """
        parameters = _sampling_parameters(sampling)
        eos = await self.eos_token() if turns is not None else ""
        inputs = _chat_inputs(text, prompt, turns, system, lambda: eos)
        async with contextlib.aclosing(self.answer(inputs, parameters)) as pieces:
            async for piece in pieces:
                yield piece

    async def answer(self, inputs: list[tuple[str, str]], parameters: dict[str, Any]) -> AsyncIterator[str]:
        """Pieces of the answer to checked inputs and parameters: oatui's inputs, or Triton's LLM
        conventions for a model that takes only those (found out from its first refusal, then kept
        for this client)."""
        if not self._llm:
            received = False
            try:
                async with contextlib.aclosing(self._pieces(inputs, parameters)) as pieces:
                    async for piece in pieces:
                        received = True
                        yield piece
                return
            except RemoteError as error:
                if received or not _is_foreign_model(str(error)):
                    raise
                self._llm = True
        eos = await self.eos_token()
        async with contextlib.aclosing(self._pieces(*_llm_request(inputs, parameters, lambda: eos))) as pieces:
            async for piece in pieces:
                yield piece

    def _stream(self) -> Any:
        """An open gRPC stream for a request: the one the last answer left, else a new one."""
        call, self._idle = self._idle, None
        if call is None or call.done():
            # The stub of tritonclient.grpc.aio's client: its own stream_infer cannot ask for the
            # empty final response (see _stream_request).
            call = self._triton()._client_stub.ModelStreamInfer()
        self._calls.add(call)
        return call

    def _release(self, call: Any, finished: bool) -> None:
        """Keep the stream of an answer that ended for the next one; cancel any other (cancelling a
        request means cancelling the stream it travels on)."""
        self._calls.discard(call)
        if finished and self._idle is None:
            self._idle = call
        else:
            call.cancel()

    async def _pieces(self, inputs: list[tuple[str, Any]], parameters: dict[str, Any]) -> AsyncIterator[str]:
        """The pieces of one request. Until the first piece, a failure that :attr:`retry` retries
        starts the request over on a new stream; after it, any failure is an error."""
        import grpc
        from tritonclient.grpc import InferResult
        from tritonclient.utils import InferenceServerException

        request = _stream_request(self.model, inputs, parameters)
        received = False
        for attempt in itertools.count():
            call = self._stream()
            finished = False
            try:
                await call.write(request)
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
                        raise InferenceServerException(msg=response.error_message)
                    result = InferResult(response.infer_response)
                    if result.get_response().id not in ("", request.id):
                        continue  # not this request's (the stream carries one request at a time)
                    piece = _piece(result)
                    if piece:
                        received = True
                        yield piece
                    if _final(result):
                        finished = True
                        return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the caller's task is being cancelled (Esc): let it
                return  # cancel() was called: the answer just ends
            except Exception as error:  # noqa: BLE001 - classified, retried or raised below
                if received:
                    raise _broken_mid_answer(error, self.where, self.timeout) from None
                delay = self.retry.after(error, attempt, self.where, self.timeout)
            finally:
                self._release(call, finished)
            await asyncio.sleep(delay)

    async def cancel(self) -> None:
        """Cancel every answer of this client in progress; their iterators end without error."""
        for call in list(self._calls):
            call.cancel()

    async def close(self) -> None:
        await self.cancel()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> "AsyncChatClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_END = object()
_CANCELLED = object()


class ChatClient:
    """Streamed answers from a served ``policy`` model, as a blocking iterator of text pieces: an
    :class:`AsyncChatClient` on an event loop of this client's own thread.

    ``stream(...)`` yields pieces as they arrive; leaving the loop early (or ``close()`` on the
    iterator, or ``cancel()`` from another thread) cancels the request on the server. ``timeout``
    bounds the wait for each piece. One answer at a time per client; the gRPC stream stays open
    between answers (opening one costs milliseconds), and a cancellation closes it.
    """

    def __init__(self, url: str, model: str = "policy", timeout: float = 30.0, retries: int = 3) -> None:
        self._core = AsyncChatClient(url, model, timeout, retries)
        self.url, self.model, self.timeout, self.retries = url, model, self._core.timeout, self._core.retries
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # started on first use
        self._thread: threading.Thread | None = None
        self._active: queue.Queue[Any] | None = None  # where the answer in progress goes
        self._pump: concurrent.futures.Future[None] | None = None  # what fills it, on the loop
        self._closed = False

    @property
    def where(self) -> str:
        return self._core.where

    @property
    def _llm(self) -> bool:
        """Whether the model takes Triton's LLM conventions only (found out from its first refusal)."""
        return self._core._llm

    def _run(self, coroutine: Any) -> "concurrent.futures.Future[Any]":
        """``coroutine`` on this client's event loop."""
        with self._lock:
            if self._closed:
                coroutine.close()
                raise RuntimeError("this ChatClient is closed")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name=f"ChatClient {self.where}",
                                                daemon=True)
                self._thread.start()
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def eos_token(self) -> str:
        """The model's EOS token (from its config), for building the chat format from turns."""
        return self._run(self._core.eos_token()).result()

    def stream(self, text: str | None = None, *, prompt: str | None = None, turns: Sequence[Any] | None = None,
               system: str | None = None, **sampling: Any) -> Iterator[str]:
        """Pieces of the answer, as :meth:`AsyncChatClient.stream`; the request is checked (and the
        EOS token asked for, for ``turns``) here, and sent when the first piece is asked for."""
        parameters = _sampling_parameters(sampling)
        inputs = _chat_inputs(text, prompt, turns, system, self.eos_token)
        return self._pieces(inputs, parameters)

    async def _fill(self, pieces: "queue.Queue[Any]", inputs: list[tuple[str, str]], parameters: dict[str, Any]) -> None:
        """On the loop: the answer's pieces into ``pieces``, then its end or its error."""
        try:
            async with contextlib.aclosing(self._core.answer(inputs, parameters)) as answer:
                async for piece in answer:
                    pieces.put(piece)
        except Exception as error:  # noqa: BLE001 - raised in the thread that iterates
            pieces.put(error)
        else:
            pieces.put(_END)

    def _pieces(self, inputs: list[tuple[str, str]], parameters: dict[str, Any]) -> Iterator[str]:
        pieces: queue.Queue[Any] = queue.Queue()
        with self._lock:
            if self._active is not None:
                raise RuntimeError("this ChatClient is already streaming; use one client per concurrent stream")
            self._active = pieces
        pump = None
        ended = False
        try:
            pump = self._run(self._fill(pieces, inputs, parameters))
            with self._lock:
                self._pump = pump
            while True:
                item = pieces.get()  # the core bounds the wait for each piece
                if item is _CANCELLED:
                    return
                ended = item is _END or isinstance(item, Exception)
                if item is _END:
                    return
                if ended:
                    raise item
                yield item
        finally:
            if pump is not None and not ended:
                pump.cancel()  # closes the core's iterator on the loop: the request is cancelled on the server
            with self._lock:
                self._active = self._pump = None

    def cancel(self) -> None:
        """Cancel the answer in progress (from any thread); its iterator ends without error."""
        with self._lock:
            pieces, pump = self._active, self._pump
        if pieces is not None:
            pieces.put(_CANCELLED)
        if pump is not None:
            pump.cancel()

    async def _shutdown(self) -> None:
        """On the loop: close the core, then let what gRPC still does for its cancelled calls end."""
        await self._core.close()
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=1.0)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        self.cancel()
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=self.timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
