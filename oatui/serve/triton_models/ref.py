"""Triton Python-backend model: the reference model's per-token log-probs, never the full logits.

Inputs ``input_ids`` (INT64, shape [B, T]) and ``attention_mask`` (INT64 [B, T], 1 on real
tokens; optional, all ones when left out). Output ``logprobs`` (FP32 [B, T-1]):
``logprobs[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1])``, computed by
``oatui.models.scoring.token_logprobs`` (positions from the mask, so left padding is fine).

Written into a model repository by ``oatui export --mode ref``.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from oatui.serve.triton_models.common import BadRequest, configure_threads, error_response, pick_device, read_settings


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from oatui.models.loading import load_for_inference
        from oatui.models.scoring import rm_max_length

        self.settings = read_settings(args)
        self.device = pick_device(self.settings.device, args.get("model_instance_device_id"))
        configure_threads(self.device, self.settings.cpu_threads)
        self.model, self.tokenizer = load_for_inference(self.settings.model_path, "ref", self.device, self.settings.dtype)
        self.max_length = rm_max_length(self.model, self.tokenizer)
        self.vocab = self.model.get_input_embeddings().weight.shape[0]
        pb_utils.Logger.log_info(
            f"oatui ref {self.settings.name}: {self.settings.model_path} on {self.device}, reads {self.max_length} tokens"
        )

    def _inputs(self, request: "pb_utils.InferenceRequest") -> tuple[np.ndarray, np.ndarray]:
        ids_tensor = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if ids_tensor is None:
            raise BadRequest("input 'input_ids' is missing")
        ids = ids_tensor.as_numpy()
        mask_tensor = pb_utils.get_input_tensor_by_name(request, "attention_mask")
        mask = mask_tensor.as_numpy() if mask_tensor is not None else np.ones_like(ids)
        if ids.ndim != 2 or ids.shape[0] < 1:
            raise BadRequest(f"input 'input_ids' must be B×T, got shape {list(ids.shape)}")
        if mask.shape != ids.shape:
            raise BadRequest(f"'attention_mask' has shape {list(mask.shape)}, 'input_ids' {list(ids.shape)}")
        if ids.shape[1] < 2:
            raise BadRequest(f"'input_ids' needs at least 2 tokens per row for one log-prob, got {ids.shape[1]}")
        if ids.shape[1] > self.max_length:
            raise BadRequest(f"'input_ids' has {ids.shape[1]} tokens per row; this model reads at most {self.max_length}")
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise BadRequest(f"'input_ids' holds ids outside [0, {self.vocab})")
        if not np.isin(mask, (0, 1)).all():
            raise BadRequest("'attention_mask' must hold only 0 and 1")
        if (mask.sum(axis=1) == 0).any():
            raise BadRequest("'attention_mask' has a row with no tokens")
        return ids, mask

    def execute(self, requests: list["pb_utils.InferenceRequest"]) -> list["pb_utils.InferenceResponse"]:
        import torch

        from oatui.models.scoring import token_logprobs

        responses: list["pb_utils.InferenceResponse | None"] = [None] * len(requests)
        # Requests of the same length run as one batch; others one group at a time.
        groups: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for index, request in enumerate(requests):
            try:
                ids, mask = self._inputs(request)
            except BadRequest as error:
                responses[index] = error_response(str(error))
                continue
            groups.setdefault(ids.shape[1], []).append((index, ids, mask))
        for members in groups.values():
            try:
                ids = torch.from_numpy(np.concatenate([m[1] for m in members])).to(self.device)
                mask = torch.from_numpy(np.concatenate([m[2] for m in members])).to(self.device)
                with torch.no_grad():
                    out = token_logprobs(self.model, ids, mask).cpu().numpy().astype(np.float32)
            except Exception as error:  # noqa: BLE001 - answer these requests with the error, keep serving
                pb_utils.Logger.log_error(f"oatui ref {self.settings.name}: log-probs failed: {error!r}")
                for index, _, _ in members:
                    responses[index] = error_response(f"log-probs failed: {error}", internal=True)
                continue
            start = 0
            for index, member_ids, _ in members:
                rows = member_ids.shape[0]
                responses[index] = pb_utils.InferenceResponse([pb_utils.Tensor("logprobs", out[start : start + rows])])
                start += rows
        return responses  # type: ignore[return-value]

    def finalize(self) -> None:
        self.model = None
