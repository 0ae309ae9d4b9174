"""triton_host_rm / triton_host_ref pointed at a model without oatui's tensors (an Open-Assistant
``to_triton`` model): one line naming the missing tensor, before any inference request is sent."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from oatui.serve.client import ModelInterfaceError, RefLogprobClient, ScoreClient

# What Open-Assistant's model/model_training/configs/triton_config_{rm,sft}.pbtxt declare.
OA_MODELS = {
    "oa-rm": ([("input_ids", "INT32"), ("attention_mask", "INT32")], [("rewards", "FP32")]),
    "oa-ref": ([("input_ids", "INT32"), ("attention_mask", "INT32")], [("logits", "FP16")]),
    "int32-ref": ([("input_ids", "INT32"), ("attention_mask", "INT32")], [("logprobs", "FP32")]),
}


@pytest.fixture(scope="module")
def stand_in() -> Iterator[str]:
    """A gRPC server that answers model-config and model-metadata calls as one holding OA's models would."""
    import grpc
    from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

    class MetadataOnly(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ModelConfig(self, request, context):  # noqa: ANN001, ANN201, N802 - the gRPC method name
            return service_pb2.ModelConfigResponse(config=model_config_pb2.ModelConfig(name=request.name, max_batch_size=25))

        def ModelMetadata(self, request, context):  # noqa: ANN001, ANN201, N802 - the gRPC method name
            inputs, outputs = OA_MODELS[request.name]
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=request.name, versions=["1"], platform="pytorch_libtorch",
                inputs=[tensor(name=n, datatype=d, shape=[-1, -1]) for n, d in inputs],
                outputs=[tensor(name=n, datatype=d, shape=[-1, -1]) for n, d in outputs])

        def ModelInfer(self, request, context):  # noqa: ANN001, ANN201, N802
            raise AssertionError("no inference request may reach a model without oatui's tensors")

    server = grpc.server(ThreadPoolExecutor(2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(MetadataOnly(), server)
    url = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield url
    server.stop(0)


def test_open_assistant_rm_names_the_missing_input(stand_in: str) -> None:
    with ScoreClient(f"{stand_in}/oa-rm", timeout=5, retries=0) as client, \
            pytest.raises(ModelInterfaceError) as raised:
        client.score(["<|prompter|>hi<|endoftext|><|assistant|>hello<|endoftext|>"])
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{stand_in}/oa-rm: no input tensor 'text': it has inputs input_ids INT32")
    assert "outputs rewards FP32" in message and "oatui export --mode rm" in message


def test_open_assistant_ref_names_the_missing_output_then_the_datatype(stand_in: str) -> None:
    import numpy as np

    ids = np.array([[1, 2, 3]])
    with RefLogprobClient(f"{stand_in}/oa-ref", timeout=5, retries=0) as client, \
            pytest.raises(ModelInterfaceError, match=r"/oa-ref: no output tensor 'logprobs': .* outputs logits FP16"):
        client.logprobs(ids)
    with RefLogprobClient(f"{stand_in}/int32-ref", timeout=5, retries=0) as client, \
            pytest.raises(ModelInterfaceError, match=r"/int32-ref: input tensor 'input_ids' is INT32, not INT64"):
        client.logprobs(ids)


def test_the_rl_stage_gets_one_line_from_its_first_call(stand_in: str) -> None:
    """What the RL stage's scoring raises (it saves a checkpoint, then ends with this line, exit 2)."""
    import torch

    from oatui.train.ppo.scoring import RemoteFailure, RemoteReference, RemoteRewardModel

    with pytest.raises(RemoteFailure) as raised:
        RemoteRewardModel(f"{stand_in}/oa-rm", "<|endoftext|>", attempts=1, timeout=5).score(["x"])
    assert str(raised.value).startswith(f"reward model on {stand_in}/oa-rm: {stand_in}/oa-rm: no input tensor 'text'")
    assert "\n" not in str(raised.value)
    with pytest.raises(RemoteFailure, match="^reference model on .*: no output tensor 'logprobs'"):
        RemoteReference(f"{stand_in}/oa-ref", attempts=1, timeout=5).logprobs(torch.ones(1, 3, dtype=torch.long),
                                                                               torch.ones(1, 3, dtype=torch.long))
