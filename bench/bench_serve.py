"""Benchmark: chat answers streamed through Triton (gRPC) against the same model in-process.

Three ways to answer the same prompts with the same sampling settings, side by side in one run:

- ``in-process loop``: ``oatui.serve.generation.stream_text``, the decode loop the Triton policy
  model runs (KV cache, incremental detokenization), called directly;
- ``generate()``: transformers' ``model.generate`` with a ``TextIteratorStreamer``;
- ``Triton gRPC``: ``oatui.serve.client.ChatClient`` streaming from the policy model exported by
  ``oatui export`` and served by ``oatui serve``'s server code (the bundled tritonserver unless
  ``--server-bin``), started on free loopback ports for this run.

Each answer is exactly ``--max-new-tokens`` tokens (``ignore_eos``), so tokens per second compare
like with like. Time to first token is from the call to the first text piece in the caller's
hands. The prompts are measured in turns (loop, generate(), Triton, then the next prompt) after
``--warmup`` rounds, ``--rounds`` times over, in a rotating order; the table shows medians. Torch uses ``--threads`` threads on both sides
(the server's model is exported with the same ``--cpu-threads``).

    python bench/bench_serve.py --workspace WORKSPACE             # its latest SFT run's model
    python bench/bench_serve.py --model DIR --prompts 16 --max-new-tokens 64
    python bench/bench_serve.py --workspace WORKSPACE --device cuda   # both sides on the GPU
    python bench/bench_serve.py --concurrency 1 4 16   # then N streams at once through the server

With ``--concurrency``, after the comparison the same server answers N streams at once (N
``ChatClient`` threads, each answering the prompts in turn, ``--rounds`` times over), for each N
given: the aggregate tokens per second, each stream's own pace, and the time to the first token
(p50, p95), against one stream alone. The server holds the policy twice, from the same export
code: ``policy`` (batched decoding, ``--max-batch`` 16) and ``policy_serial`` (``--max-batch`` 1:
one request at a time, the others queued), and each N runs against both, side by side.
``--repeats R`` runs the whole sweep R times (alternating the order of the streams and of the
models) and shows medians, with each repeat's ratio of N streams to one stream: on a shared
machine one sweep's ratio moves by a tenth or more from one run to the next.
``--baseline-tree DIR`` serves a third copy, ``policy_baseline``, whose code (its ``model.py`` and
the ``oatui`` it imports) comes from DIR, a checkout of another commit, and compares this tree's
batched policy with it in the same server and the same sweeps.

    python bench/bench_serve.py --model DIR --prompts 8 --rounds 1 --warmup 1 --max-new-tokens 48 \
        --temperature 0 --concurrency 1 2 4 8 16
    python bench/bench_serve.py --model DIR --prompts 8 --rounds 3 --warmup 2 --max-new-tokens 48 \
        --temperature 0 --concurrency 1 8 --repeats 6 --baseline-tree ../oatui-before
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = [
    "How do I get started with baking bread?",
    "What is a good way to learn a new language?",
    "Can you explain how photosynthesis works?",
    "Give me three tips for sleeping better.",
    "How should I prepare for a job interview?",
    "What are the benefits of regular exercise?",
    "How do I keep a houseplant alive?",
    "Write a short poem about the sea.",
    "What is the difference between weather and climate?",
    "How can I save money on groceries?",
    "Why is the sky blue?",
    "How do I make a good cup of coffee?",
    "What should I pack for a weekend hike?",
    "How do vaccines work?",
    "Explain recursion to a beginner.",
    "What is a healthy breakfast?",
]


@dataclass
class Series:
    name: str
    first_ms: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    decode_per_s: list[float] = field(default_factory=list)

    def add(self, first_s: float, total_s: float, tokens: int) -> None:
        self.first_ms.append(first_s * 1000)
        self.tokens_per_s.append(tokens / total_s)
        # After the first piece (one token): the pace of the stream itself, first-token wait excluded.
        self.decode_per_s.append((tokens - 1) / max(total_s - first_s, 1e-9))

    @property
    def first(self) -> float:
        return statistics.median(self.first_ms)

    @property
    def rate(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def decode_rate(self) -> float:
        return statistics.median(self.decode_per_s)


def timed(pieces) -> tuple[float, float, str]:  # noqa: ANN001
    """Consume a stream of text pieces: (seconds to the first, seconds in all, the text)."""
    started = time.perf_counter()
    first = None
    text = []
    for piece in pieces:
        if first is None:
            first = time.perf_counter() - started
        text.append(piece)
    total = time.perf_counter() - started
    return (first if first is not None else total), total, "".join(text)


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in (0, 1])."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(share * len(ordered) + 0.999999) - 1))]


def concurrent_streams(url: str, texts: list[str], streams: int, rounds: int, model: str = "policy",
                       **sampling) -> tuple[float, list[float], list[float]]:  # noqa: ANN003
    """``streams`` clients answering at once: (wall seconds, each answer's seconds, each answer's first-piece seconds)."""
    from oatui.serve.client import ChatClient

    totals: list[float] = []
    firsts: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start_line = threading.Barrier(streams + 1)

    def stream(index: int) -> None:
        try:
            with ChatClient(url, model=model, timeout=300) as client:
                start_line.wait()
                for answer in range(rounds * len(texts)):
                    text = texts[(index + answer) % len(texts)]
                    first, total, _ = timed(client.stream(text, seed=index * 1000 + answer, **sampling))
                    with lock:
                        totals.append(total)
                        firsts.append(first)
        except BaseException as error:  # noqa: BLE001 - reported by the caller
            errors.append(error)
            start_line.abort()

    workers = [threading.Thread(target=stream, args=(index,)) for index in range(streams)]
    for worker in workers:
        worker.start()
    try:
        start_line.wait()
    except threading.BrokenBarrierError:
        pass
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    if errors:
        raise SystemExit(f"--concurrency {streams}: a stream failed: {errors[0]}")
    return wall, totals, firsts


def resolve_model(args: argparse.Namespace) -> Path:
    from oatui.serve.repository import resolve_model as resolve
    from oatui.stages.runs import latest_final
    from oatui.workspace import Workspace

    workspace = Workspace.open(args.workspace, create=False)
    if args.model:
        return resolve(args.model, workspace.root / "runs")
    latest = latest_final(workspace.root / "runs", "sft") if (workspace.root / "runs").is_dir() else None
    if latest is not None:
        return latest
    from oatui.models.tiny import TINY_SHAPE, ensure_tiny_model

    print("no SFT run in the workspace: using the untrained tiny model", file=sys.stderr)
    return ensure_tiny_model(Workspace.open(args.workspace).models, dict(TINY_SHAPE))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint folder or run id (default: the workspace's latest SFT run)")
    parser.add_argument("--workspace", default=os.environ.get("OATUI_WORKSPACE") or "workspace")
    parser.add_argument("--prompts", type=int, default=16, help="prompts measured (default 16)")
    parser.add_argument("--warmup", type=int, default=3, help="rounds before measuring (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="times each prompt is measured (default 3)")
    parser.add_argument("--pause-ms", type=float, default=50, help="pause before each measured answer (default 50)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads on both sides (default 0: half the cores, as the server picks)")
    parser.add_argument("--server-bin", help="tritonserver to run (default: on PATH, else the bundled one)")
    parser.add_argument("--concurrency", type=int, nargs="+", metavar="N",
                        help="then N streams at once through the server, for each N given (e.g. 1 4 16)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --concurrency: run the sweep this many times and show medians (default 1)")
    parser.add_argument("--baseline-tree", metavar="DIR",
                        help="with --concurrency: also serve the policy from another checkout of oatui (DIR) "
                             "and compare this tree's with it")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides run the model: the in-process paths, and the server's model "
                             "(exported with this --device); default cpu")
    args = parser.parse_args(argv)
    if args.concurrency and min(args.concurrency) < 1:
        parser.error("--concurrency: each N must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if (args.repeats > 1 or args.baseline_tree) and not args.concurrency:
        parser.error("--repeats and --baseline-tree go with --concurrency")
    baseline_source = None
    if args.baseline_tree:
        baseline_source = Path(args.baseline_tree).resolve() / "oatui" / "serve" / "triton_models" / "policy.py"
        if not baseline_source.is_file():
            parser.error(f"--baseline-tree {args.baseline_tree}: no oatui/serve/triton_models/policy.py there")

    import torch
    from transformers import TextIteratorStreamer

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    from oatui.data.format import format_conversation
    from oatui.models.loading import load_for_inference
    from oatui.serve.client import ChatClient
    from oatui.serve.generation import SamplingParams, context_limit, stream_text
    from oatui.serve.repository import export_model
    from oatui.netutil import free_ports
    from oatui.serve.record import ServerOptions
    from oatui.serve.server import TritonServer
    from oatui.serve.triton_models.common import cpu_threads
    from oatui.workspace import Workspace

    threads = cpu_threads(args.threads)
    torch.set_num_threads(threads)
    model_path = resolve_model(args)
    model, tokenizer = load_for_inference(str(model_path), "policy", device=args.device)
    limit = context_limit(model, tokenizer)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            ignore_eos=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    texts = [format_conversation([("prompter", p)], tokenizer.eos_token, add_generation_prompt=True) for p in prompts]
    for text in texts:
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) + args.max_new_tokens > limit:
            parser.error(f"--max-new-tokens {args.max_new_tokens}: prompts would pass the context of {limit}")

    with tempfile.TemporaryDirectory(prefix="oatui-bench-serve-") as scratch:
        workspace = Workspace.open(Path(scratch) / "ws")
        export_model("policy", model_path, workspace.triton_repo, cpu_threads=threads, device=args.device)
        if args.concurrency:
            export_model("policy", model_path, workspace.triton_repo, name="policy_serial", max_batch=1,
                         cpu_threads=threads, device=args.device)
        if baseline_source is not None:
            export_model("policy", model_path, workspace.triton_repo, name="policy_baseline", cpu_threads=threads,
                         device=args.device)
            write_baseline_model(baseline_source, workspace.triton_repo / "policy_baseline" / "1" / "model.py")
        http, grpc, metrics = free_ports(3)
        options = ServerOptions(repo=str(workspace.triton_repo), http_port=http, grpc_port=grpc,
                                metrics_port=metrics, server_bin=args.server_bin)
        server = TritonServer(workspace, options)
        started = time.perf_counter()
        server.start()
        startup = time.perf_counter() - started
        client = ChatClient(server.info().grpc_url, timeout=60)
        loop, generate, triton = Series("in-process loop"), Series("generate()"), Series("Triton gRPC stream")
        mismatches = 0
        try:
            def run_loop(text: str, seed: int) -> tuple[float, float, str]:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                return timed(stream_text(model, tokenizer, ids, SamplingParams(**{**params.__dict__, "seed": seed}),
                                         limit=limit))

            def run_generate(text: str, seed: int) -> tuple[float, float, str]:
                torch.manual_seed(seed)
                streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
                inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)
                kwargs = dict(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens,
                              min_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
                if args.temperature > 0:
                    kwargs.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=1.0)
                else:
                    kwargs.update(do_sample=False)

                def work() -> None:
                    with torch.inference_mode():
                        model.generate(**kwargs)

                started = time.perf_counter()
                worker = threading.Thread(target=work)
                worker.start()
                first, _, text_out = timed(streamer)
                worker.join()
                return first + 0.0, time.perf_counter() - started, text_out

            def run_triton(text: str, seed: int) -> tuple[float, float, str]:
                return timed(client.stream(text, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                           top_k=args.top_k, ignore_eos=True, seed=seed))

            for round_index in range(args.warmup):
                for run in (run_loop, run_generate, run_triton):
                    run(texts[round_index % len(texts)], round_index)
            paths = [(loop, run_loop), (generate, run_generate), (triton, run_triton)]
            load_before = os.getloadavg()
            for round_index in range(args.rounds):
                for index, text in enumerate(texts):
                    seed = 1000 + index
                    answers = {}
                    # Rotate the order so that no path always runs first (or last) after a pause.
                    shift = (round_index * len(texts) + index) % len(paths)
                    for series, run in paths[shift:] + paths[:shift]:
                        # Every path starts from a pause: on a shared machine the scheduler favours a
                        # process that slept (the server and its stub do between answers).
                        time.sleep(args.pause_ms / 1000)
                        first, total, answers[series.name] = run(text, seed)
                        series.add(first, total, args.max_new_tokens)
                    mismatches += answers[triton.name] != answers[loop.name]
            load_after = os.getloadavg()
            models = ["policy", "policy_serial"] + (["policy_baseline"] if baseline_source is not None else [])
            sweeps: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
            if baseline_source is not None:  # its own warm-up: the others had theirs above
                concurrent_streams(server.info().grpc_url, texts, max(args.concurrency), 1, model="policy_baseline",
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, ignore_eos=True)
            for repeat in range(args.repeats if args.concurrency else 0):
                # Alternate the orders, so that neither the first sweeps nor the first model gain from it.
                counts = args.concurrency if repeat % 2 == 0 else args.concurrency[::-1]
                for streams in counts:
                    for name in models if repeat % 2 == 0 else models[::-1]:
                        wall, totals, firsts = concurrent_streams(
                            server.info().grpc_url, texts, streams, args.rounds, model=name,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            ignore_eos=True)
                        sweeps.setdefault((name, streams), []).append((
                            len(totals) * args.max_new_tokens / wall,
                            statistics.median(args.max_new_tokens / t for t in totals),
                            percentile(firsts, 0.5) * 1000, percentile(firsts, 0.95) * 1000))
        finally:
            client.close()
            server.stop()

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    measured = args.prompts * args.rounds
    print(f"model {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"{args.prompts} prompts x {args.rounds} rounds after {args.warmup} warm-up rounds, "
          f"{args.max_new_tokens} new tokens each, temperature {args.temperature}, top_k {args.top_k}")
    if args.device == "cuda":
        print(f"GPU {torch.cuda.get_device_name()} on both sides")
    print(f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {threads} thread(s) on each side; "
          f"tritonserver ready in {startup:.1f} s; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"Triton answers equal to the in-process loop's (same seeds): {measured - mismatches}/{measured}")
    print()
    print(f"| {'path':<22} | {'first token':>11} | {'tokens/s':>8} | {'tokens/s after the first':>24} |")
    print(f"|{'-' * 24}|{'-' * 13}|{'-' * 10}|{'-' * 26}|")
    for series in (loop, generate, triton):
        print(f"| {series.name:<22} | {series.first:>8.1f} ms | {series.rate:>8.0f} | {series.decode_rate:>24.0f} |")
    print("(medians; tokens/s = answer tokens / time from the call to the last piece)")
    print()
    for name, other in (("in-process loop", loop), ("generate()", generate)):
        print(f"Triton vs {name + ':':<16} first token {triton.first - other.first:+.1f} ms, throughput "
              f"{triton.rate / other.rate:.2f}x (after the first token {triton.decode_rate / other.decode_rate:.2f}x)")
    print("goals: first-token overhead < 10 ms, throughput >= 0.90x the in-process loop")
    if sweeps:
        print_concurrency(args, sweeps)
    return 0


def write_baseline_model(source: Path, target: Path) -> None:
    """``target`` (an exported policy's model.py) replaced by the baseline tree's ``source``, made to
    import that tree's oatui (the stub runs each model in a process of its own)."""
    tree = source.parents[3]
    text = source.read_text()
    line = f"import sys; sys.path.insert(0, {str(tree)!r})  # the baseline tree's oatui, not this one's\n"
    future = "from __future__ import annotations\n"
    text = text.replace(future, future + line, 1) if future in text else line + text
    check = (f"\nimport oatui as _baseline_oatui\nassert _baseline_oatui.__file__.startswith({str(tree)!r}), "
             "_baseline_oatui.__file__\n")
    target.write_text(text + check)


def print_concurrency(args: argparse.Namespace, sweeps: dict[tuple[str, int], list[tuple[float, ...]]]) -> None:
    """The concurrency table: medians over the repeats, and each repeat's N-to-1 ratios."""
    def median(name: str, streams: int, field: int) -> float:
        return statistics.median(values[field] for values in sweeps[(name, streams)])

    def ratios(name: str, streams: int) -> list[float]:
        """Each repeat's aggregate tokens/s at ``streams`` over its own at 1 stream."""
        if (name, 1) not in sweeps:
            return []
        return [many[0] / one[0] for many, one in zip(sweeps[(name, streams)], sweeps[(name, 1)])]

    def ratio_text(name: str, streams: int) -> str:
        each = ratios(name, streams)
        return f"{statistics.median(each):.2f}x" if each else "-"

    counts = sorted({streams for _, streams in sweeps})
    repeats = f", medians of {args.repeats} sweeps" if args.repeats > 1 else ""
    print()
    print(f"Concurrent streams through Triton ({args.prompts} prompts x {args.rounds} rounds per stream{repeats}), "
          "batched decoding (policy) against one request at a time (policy_serial, --max-batch 1):")
    print("| streams | batched tokens/s | per stream | first token p50 / p95 | one at a time tokens/s "
          "| first token p50 / p95 | batched vs 1 stream | batched vs one at a time |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for streams in counts:
        print(f"| {streams} | {median('policy', streams, 0):.0f} | {median('policy', streams, 1):.0f} "
              f"| {median('policy', streams, 2):.1f} / {median('policy', streams, 3):.1f} ms "
              f"| {median('policy_serial', streams, 0):.0f} | {median('policy_serial', streams, 2):.1f} / "
              f"{median('policy_serial', streams, 3):.1f} ms | {ratio_text('policy', streams)} "
              f"| {median('policy', streams, 0) / median('policy_serial', streams, 0):.2f}x |")
    if 1 in counts:
        unloaded = median("policy", 1, 2)
        worst = max(median("policy", streams, 2) for streams in counts)
        print(f"first token p50, batched: at most {worst / unloaded:.2f}x the single stream's")
        if args.repeats > 1:
            for streams in counts:
                if streams > 1:
                    each = ratios("policy", streams)
                    print(f"{streams} streams vs 1, each sweep: " + " ".join(f"{r:.2f}" for r in each)
                          + f" (median {statistics.median(each):.2f}, lowest {min(each):.2f})")
    print("goals: 8 streams >= 4x the aggregate tokens/s of 1 stream; first token at 8 streams < 3x one stream's")
    if args.baseline_tree:
        print()
        print(f"This tree's batched policy against the baseline tree's ({args.baseline_tree}), same server and sweeps:")
        print("| streams | this tree tokens/s | baseline tokens/s | this vs baseline | first token p50, this / baseline "
              "| this tree vs 1 stream | baseline vs 1 stream |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for streams in counts:
            mine, theirs = median("policy", streams, 0), median("policy_baseline", streams, 0)
            print(f"| {streams} | {mine:.0f} | {theirs:.0f} | {mine / theirs:.2f}x "
                  f"| {median('policy', streams, 2):.1f} / {median('policy_baseline', streams, 2):.1f} ms "
                  f"| {ratio_text('policy', streams)} | {ratio_text('policy_baseline', streams)} |")


if __name__ == "__main__":
    sys.exit(main())
