"""Batched decoding (``BatchedGenerator``) against the one-sequence loop on a real (untrained) tiny
model, the LLM-convention parameters, and ``oatui export --engine vllm``'s files (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_oatui, untrained_tiny_lm
from oatui.serve.generation import (
    BatchedGenerator,
    GenerationRequest,
    SamplingParams,
    generate_ids,
    translate_llm_parameters,
)

PROMPTS = ["How do I bake bread?", "Why is the sky blue?", "Write a poem about the sea.", "Hi",
           "Explain recursion to a beginner, please, in a few words.", "What is tea?", "Tell me a joke.", "Go"]


@pytest.fixture(scope="module")
def tiny_lm():
    return untrained_tiny_lm(96)


class Run:
    """Submit requests to one generator, step it, collect each request's tokens and end."""

    def __init__(self, model, tokenizer, stop_ids: set[int] | None = None, **limits) -> None:  # noqa: ANN001, ANN003
        self.tokenizer = tokenizer
        self.generator = BatchedGenerator(model, stop_ids if stop_ids is not None else {tokenizer.eos_token_id},
                                          len(tokenizer), 96, **limits)
        self.tokens: list[list[int]] = []
        self.ends: list[str | None] = []

    def submit(self, prompt: str, params: SamplingParams, should_stop=None) -> int:  # noqa: ANN001
        index = len(self.tokens)
        self.tokens.append([])
        self.ends.append(None)

        def on_end(reason: str, error: BaseException | None) -> None:
            assert error is None, error
            self.ends[index] = reason

        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        self.generator.submit(GenerationRequest(ids, params, self.tokens[index].append, on_end, should_stop))
        return index

    def finish(self) -> None:
        while self.generator.running or self.generator.waiting:
            self.generator.step()


def alone(model, tokenizer, prompt: str, params: SamplingParams) -> list[int]:  # noqa: ANN001
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return list(generate_ids(model, ids, params, {tokenizer.eos_token_id}, len(tokenizer), 96))


@pytest.mark.parametrize("min_room", [32, 1, "stacked"])
def test_greedy_is_identical_alone_and_batched_as_requests_join_and_leave(tiny_lm, min_room: int | str,  # noqa: ANN001
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With the usual room in the cache's buffers, with so little that they grow every few steps,
    and with the cache as DynamicCache tensors, stacked and selected (what other caches get)."""
    import oatui.serve.generation as generation

    if min_room == "stacked":
        monkeypatch.setattr(BatchedGenerator, "_fits_slots", staticmethod(lambda layers: False))
    else:
        monkeypatch.setattr(generation, "MIN_ROOM", min_room)
    model, tokenizer = tiny_lm
    # Different lengths: rows leave at different steps; newcomers join a batch already under way.
    params = [SamplingParams(max_new_tokens=6 + 3 * i, temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]
    expected = [alone(model, tokenizer, prompt, p) for prompt, p in zip(PROMPTS, params)]
    run = Run(model, tokenizer)
    layer_class = generation.roomy_layer_class()
    for prompt, p in zip(PROMPTS, params):
        run.submit(prompt, p)
        for _ in range(2):
            run.generator.step()
            layers = run.generator.cache.layers
            # A full-attention model's cache, in buffers with room (unless made to stack).
            assert all((type(layer) is layer_class) == (min_room != "stacked") for layer in layers)
            assert layers[0].keys.shape[2] == run.generator.width == run.generator.mask.shape[1]
            assert layers[0].keys.shape[0] == len(run.generator.running) == run.generator.positions.shape[0]
    grown = []  # new buffers once every request has joined: only a step out of room makes them
    reshape = run.generator._reshape
    run.generator._reshape = lambda rows, width: (grown.append(width), reshape(rows, width))
    run.finish()
    assert run.tokens == expected
    assert run.ends == ["length"] * len(PROMPTS)
    assert run.generator.max_rows_seen > 3  # they were decoded together
    assert run.generator.cache is None and run.generator.mask is None  # nothing left behind
    assert not run.generator.running and not run.generator.waiting
    assert (grown == []) if min_room in (32, "stacked") else grown


def test_seeded_sampling_is_the_same_alone_and_batched(tiny_lm) -> None:  # noqa: ANN001
    model, tokenizer = tiny_lm
    params = [SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=20, repetition_penalty=1.3,
                             seed=100 + i, ignore_eos=True) for i in range(4)]
    # Greedy rows beside sampled ones: each row keeps its own parameters and generator.
    params.append(SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    expected = [alone(model, tokenizer, PROMPTS[i], p) for i, p in enumerate(params)]
    run = Run(model, tokenizer)
    for i, p in enumerate(params):
        run.submit(PROMPTS[i], p)
    run.finish()
    assert run.tokens == expected
    assert len({tuple(t) for t in run.tokens}) == len(params)


def test_padded_decode_steps_give_sdpa_the_padding_mask_with_the_same_tokens(tiny_lm) -> None:  # noqa: ANN001
    """Rows of different lengths (left padding): a decode step hands SDPA the padding mask as its
    4-D boolean mask instead of the 2-D mask transformers expands, and every token stays the same."""
    from transformers import GPTNeoXConfig

    from oatui.serve.generation import _padding_mask_is_sdpa_mask

    model, tokenizer = tiny_lm
    params = [SamplingParams(max_new_tokens=5 + 2 * i, temperature=0.8, seed=7 + i, ignore_eos=True) if i % 2 else
              SamplingParams(max_new_tokens=5 + 2 * i, temperature=0, ignore_eos=True) for i in range(6)]
    results = []
    for direct in (False, True):
        masks = []
        forward = model.forward

        def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            mask = kwargs["attention_mask"]
            masks.append(None if mask is None else mask.dim())
            return forward(*args, **kwargs)

        model.forward = spy
        try:
            run = Run(model, tokenizer)
            assert run.generator.sdpa_padding_mask
            run.generator.sdpa_padding_mask = direct
            for prompt, p in zip(PROMPTS, params):
                run.submit(prompt, p)
                run.generator.step()  # each joins a batch under way
            run.finish()
        finally:
            del model.forward
        assert (4 in masks) == direct
        results.append(run.tokens)
    assert results[0] == results[1]
    # Not for a model whose layers see a window of the context only.
    config = GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    config._attn_implementation = "sdpa"
    assert _padding_mask_is_sdpa_mask(config)
    config.sliding_window = 16
    assert not _padding_mask_is_sdpa_mask(config)
    config.sliding_window = None
    config._attn_implementation = "eager"
    assert not _padding_mask_is_sdpa_mask(config)


def test_a_stop_token_ends_its_row_only(tiny_lm) -> None:  # noqa: ANN001
    model, tokenizer = tiny_lm
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    free = alone(model, tokenizer, PROMPTS[0], params)
    stop = free[3]  # the fourth token of the first answer stops it
    stopped = list(generate_ids(model, tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"],
                                SamplingParams(max_new_tokens=10, temperature=0), {stop}, len(tokenizer), 96))
    others = [alone(model, tokenizer, prompt, params) for prompt in PROMPTS[1:4]]
    run = Run(model, tokenizer, stop_ids={stop})
    run.submit(PROMPTS[0], SamplingParams(max_new_tokens=10, temperature=0))
    for prompt in PROMPTS[1:4]:
        run.submit(prompt, params)  # ignore_eos: the stop token does not end these
    run.finish()
    assert run.tokens[0] == stopped == free[:3] and run.ends[0] == "stop"
    assert run.tokens[1:] == others


def test_cancelling_one_of_eight_leaves_the_others_unchanged(tiny_lm) -> None:  # noqa: ANN001
    model, tokenizer = tiny_lm
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    expected = [alone(model, tokenizer, prompt, params) for prompt in PROMPTS]
    run = Run(model, tokenizer)
    cancelled = {"now": False}
    for i, prompt in enumerate(PROMPTS):
        run.submit(prompt, params, (lambda: cancelled["now"]) if i == 2 else None)
    for _ in range(5):
        run.generator.step()
    cancelled["now"] = True
    run.finish()
    assert run.ends[2] == "cancelled" and 1 <= len(run.tokens[2]) <= 6
    assert run.tokens[2] == expected[2][: len(run.tokens[2])]
    assert [t for i, t in enumerate(run.tokens) if i != 2] == [t for i, t in enumerate(expected) if i != 2]


def test_requests_beyond_the_batch_limits_wait_in_the_queue(tiny_lm) -> None:  # noqa: ANN001
    model, tokenizer = tiny_lm
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    expected = [alone(model, tokenizer, prompt, params) for prompt in PROMPTS[:5]]
    run = Run(model, tokenizer, max_batch=2)
    for prompt in PROMPTS[:5]:
        run.submit(prompt, params)
    run.generator.step()
    assert len(run.generator.running) == 2 and run.generator.queued == 3
    run.finish()
    assert run.tokens == expected and run.generator.max_rows_seen == 2
    # Tokens in flight: prompt plus budget reserved per row; one request alone always goes in.
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 8 for p in PROMPTS[:3]]
    run = Run(model, tokenizer, max_tokens_in_flight=lengths[0] + lengths[1] - 1)
    for prompt in PROMPTS[:3]:
        run.submit(prompt, params)
    run.generator.step()
    assert len(run.generator.running) == 1 and run.generator.queued == 2
    run.finish()
    assert run.tokens == expected[:3] and run.generator.max_rows_seen == 1


def test_llm_parameter_names_and_string_values() -> None:
    assert translate_llm_parameters({"max_tokens": "16", "temperature": "0.1", "top_p": "0.95", "top_k": -1,
                                     "seed": "7", "ignore_eos": "true"}) == {
        "max_new_tokens": 16, "temperature": 0.1, "top_p": 0.95, "top_k": 0, "seed": 7, "ignore_eos": True}
    assert translate_llm_parameters({"max_new_tokens": 5, "stream": False}) == {"max_new_tokens": 5, "stream": False}
    # The role markers as stop strings: stops already; anything else is refused.
    assert translate_llm_parameters({"stop": ["<|prompter|>", "<|system|>"], "seed": 1}) == {"seed": 1}
    with pytest.raises(ValueError, match="stop: only the role markers"):
        translate_llm_parameters({"stop": ["\n\n"]})
    with pytest.raises(ValueError, match="max_tokens"):
        translate_llm_parameters({"max_tokens": 3, "max_new_tokens": 4})
    # A value that is not a number stays a string, and the usual check names it.
    with pytest.raises(ValueError, match="temperature must be a number"):
        SamplingParams.from_mapping(translate_llm_parameters({"temperature": "hot"}))


def test_export_for_the_vllm_backend(tiny_lm, tmp_path: Path) -> None:  # noqa: ANN001
    """The files the vLLM backend documents (samples/model_repository/vllm_model): config.pbtxt with
    backend "vllm", decoupled, max_batch_size 0, text_input/stream/sampling_parameters in and
    text_output out, and 1/model.json holding vLLM engine arguments with the model."""
    import re

    model, tokenizer = tiny_lm
    checkpoint = tmp_path / "final"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    repo = tmp_path / "repo"
    result = run_oatui("export", "--mode", "policy", "--engine", "vllm", "--model", str(checkpoint), "--repo", str(repo),
                       "--name", "vllm_model", "--gpu-memory-utilization", "0.4", "--engine-arg",
                       "tensor_parallel_size=2", "--engine-arg", "enforce_eager=true", workspace=tmp_path / "ws")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (repo / "vllm_model").iterdir()) == ["1", "config.pbtxt", "oatui_export.json"]
    assert sorted(p.name for p in (repo / "vllm_model" / "1").iterdir()) == ["model.json"]
    config = (repo / "vllm_model" / "config.pbtxt").read_text()
    assert 'name: "vllm_model"' in config and 'backend: "vllm"' in config
    assert "max_batch_size: 0" in config and "decoupled: true" in config and "KIND_MODEL" in config
    inputs = dict(re.findall(r'name: "(\w+)" data_type: (TYPE_\w+) dims: \[ 1 \]( optional: true)? }', config)
                  and [(n, t) for n, t, _ in re.findall(r'name: "(\w+)" data_type: (TYPE_\w+) dims: \[ -?1 \]( optional: true)?', config)])
    assert inputs == {"text_input": "TYPE_STRING", "stream": "TYPE_BOOL", "sampling_parameters": "TYPE_STRING",
                      "exclude_input_in_output": "TYPE_BOOL", "text_output": "TYPE_STRING"}
    assert '{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }' in config  # required, as vLLM's
    assert 'key: "eos_token"' in config  # oatui's chat client reads it
    engine_args = json.loads((repo / "vllm_model" / "1" / "model.json").read_text())
    assert engine_args == {"model": str(checkpoint), "dtype": "auto", "gpu_memory_utilization": 0.4,
                           "max_model_len": 96, "tensor_parallel_size": 2, "enforce_eager": True}
    # What does not fit is one line and exit 2.
    for args, needle in [(["--mode", "rm", "--engine", "vllm"], "policy only"),
                         (["--mode", "policy", "--engine-arg", "a=1"], "--engine vllm"),
                         (["--mode", "policy", "--engine", "vllm", "--engine-arg", "no-equals"], "KEY=VALUE"),
                         (["--mode", "policy", "--engine", "vllm", "--gpu-memory-utilization", "1.5"], "(0, 1]")]:
        bad = run_oatui("export", *args, "--model", str(checkpoint), "--repo", str(tmp_path / "other"),
                        workspace=tmp_path / "ws")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and needle in bad.stderr, bad.stderr
