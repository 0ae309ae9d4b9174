"""`oatui export`: write a model into a Triton model repository (Python backend)."""

from __future__ import annotations

import argparse

from oatui.errors import UserError
from oatui.fsutil import expand_user

DESCRIPTION = """\
Write a Triton model repository entry REPO/NAME (config.pbtxt and 1/model.py, Python backend)
for a checkpoint: 'policy' streams chat answers (decoupled), 'rm' scores conversations,
'ref' returns per-token log-probs. The checkpoint is referenced by its absolute path; --copy
copies it into NAME/1/checkpoint/ instead, so the repository can be moved to another machine
(its tritonserver's Python environment needs oatui installed). Serve it with 'oatui serve'.
'--engine vllm' writes the policy for Triton's vLLM backend instead (config.pbtxt with backend
"vllm" and 1/model.json, vLLM's engine arguments): for GPU servers whose image has that backend;
unverified until run on a GPU.
"""


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "export",
        parents=parents,
        help="write a model into a Triton model repository",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", required=True, choices=("policy", "rm", "ref"),
                        help="policy: streaming chat; rm: reward scores; ref: per-token log-probs")
    parser.add_argument("--model", required=True, metavar="DIR|RUN",
                        help="a checkpoint folder with config.json, or a run id (its final/ is used)")
    parser.add_argument("--name", help="model name in the repository (default: the mode)")
    parser.add_argument("--repo", metavar="DIR", help="model repository (default: WORKSPACE/triton)")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N",
                        help="rm/ref: largest batch per request and for dynamic batching; policy: most requests "
                             "decoded together, more wait in a queue (default 16)")
    parser.add_argument("--engine", choices=("python", "vllm"), default="python",
                        help="policy: python (default: oatui's model on the Python backend, CPU or GPU) or vllm "
                             "(Triton's vLLM backend: 1/model.json naming the checkpoint; GPU servers with that "
                             "backend only)")
    parser.add_argument("--gpu-memory-utilization", type=float, metavar="F",
                        help="--engine vllm: share of the GPU's memory vLLM may take (default 0.5)")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="--engine vllm: one more vLLM engine argument for model.json (VALUE read as JSON "
                             "when it is), e.g. tensor_parallel_size=2; repeatable")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the server runs the model; auto: CUDA when it sees a GPU, else CPU")
    parser.add_argument("--instance-kind", choices=("model", "gpu"), default="model",
                        help="Triton instance group: model (KIND_MODEL, default: one instance that picks CUDA or "
                             "the CPU itself) or gpu (KIND_GPU: one instance per GPU the server sees; needs GPUs)")
    parser.add_argument("--cpu-threads", type=int, default=0, metavar="N",
                        help="torch threads for a model on the CPU (default 0: half the cores the server may use)")
    parser.add_argument("--copy", action="store_true",
                        help="copy the checkpoint into NAME/1/ (to move the repository to another machine)")
    parser.add_argument("--force", action="store_true", help="replace an existing model of the same name")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oatui.serve.repository import export_model, resolve_model
    from oatui.workspace import Workspace

    from oatui.serve.repository import parse_engine_args

    engine_args = parse_engine_args(args.engine_arg)
    if args.gpu_memory_utilization is not None:
        if not 0 < args.gpu_memory_utilization <= 1:
            raise UserError(f"--gpu-memory-utilization {args.gpu_memory_utilization}: must be in (0, 1]")
        engine_args["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.engine != "vllm" and engine_args:
        raise UserError("--gpu-memory-utilization and --engine-arg go with --engine vllm")
    workspace = Workspace.open(args.workspace)
    model = resolve_model(args.model, workspace.root / "runs")
    repo = expand_user(args.repo).absolute() if args.repo else workspace.triton_repo
    result = export_model(
        args.mode,
        model,
        repo,
        name=args.name,
        max_batch=args.max_batch,
        device=args.device,
        copy=args.copy,
        force=args.force,
        cpu_threads=args.cpu_threads,
        instance_kind=args.instance_kind,
        engine=args.engine,
        engine_args=engine_args,
    )
    verb = "replaced" if result.replaced else "wrote"
    engine = ", Triton's vLLM backend" if args.engine == "vllm" else ""
    print(f"{verb} {result.path} ({result.mode}{engine}, model {result.model_path})")
    return 0
