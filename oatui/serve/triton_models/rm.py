"""Triton Python-backend model: the reward model, one score per conversation, dynamically batched.

Input ``text`` (BYTES, shape [B, 1]): conversations in the chat format, each ending with the
assistant reply to judge (what ``oatui.data.datasets.rm_text`` builds). Output ``score`` (FP32,
shape [B, 1]). Scores come from ``oatui.models.scoring.score_texts`` with ``rm_max_length``, so
they equal in-process scores; like there, a text longer than the model reads keeps its end.

Written into a model repository by ``oatui export --mode rm``.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from oatui.serve.triton_models.common import (
    BadRequest,
    configure_threads,
    decode_texts,
    error_response,
    pick_device,
    read_settings,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from oatui.models.loading import load_for_inference
        from oatui.models.scoring import rm_max_length

        self.settings = read_settings(args)
        self.device = pick_device(self.settings.device, args.get("model_instance_device_id"))
        configure_threads(self.device, self.settings.cpu_threads)
        self.model, self.tokenizer = load_for_inference(self.settings.model_path, "rm", self.device, self.settings.dtype)
        self.max_length = rm_max_length(self.model, self.tokenizer)
        self.batch_size = max(1, self.settings.max_batch_size or 16)
        pb_utils.Logger.log_info(
            f"oatui rm {self.settings.name}: {self.settings.model_path} on {self.device}, reads {self.max_length} tokens"
        )

    def _texts(self, request: "pb_utils.InferenceRequest") -> list[str]:
        tensor = pb_utils.get_input_tensor_by_name(request, "text")
        texts = decode_texts(tensor.as_numpy() if tensor is not None else None, "text", self.settings.max_text_bytes)
        assert texts is not None
        if not texts:
            raise BadRequest("input 'text' holds no conversations")
        for index, text in enumerate(texts):
            if not text.strip():
                raise BadRequest(f"input 'text' row {index} is empty")
        return texts

    def execute(self, requests: list["pb_utils.InferenceRequest"]) -> list["pb_utils.InferenceResponse"]:
        from oatui.models.scoring import score_texts

        # The dynamic batcher hands over several requests at once: score all their rows together.
        batches: list[list[str] | str] = []
        for request in requests:
            try:
                batches.append(self._texts(request))
            except BadRequest as error:
                batches.append(str(error))
        rows = [text for texts in batches if isinstance(texts, list) for text in texts]
        try:
            scores = score_texts(self.model, self.tokenizer, rows, self.max_length, self.batch_size) if rows else []
        except Exception as error:  # noqa: BLE001 - a failure answers these requests, the stub lives on
            pb_utils.Logger.log_error(f"oatui rm {self.settings.name}: scoring failed: {error!r}")
            return [error_response(f"scoring failed: {error}", internal=True) for _ in requests]
        responses = []
        start = 0
        for texts in batches:
            if isinstance(texts, str):
                responses.append(error_response(texts))
                continue
            values = np.asarray(scores[start : start + len(texts)], dtype=np.float32).reshape(-1, 1)
            start += len(texts)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("score", values)]))
        return responses

    def finalize(self) -> None:
        self.model = None
