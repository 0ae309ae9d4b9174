"""`oatui export`: write a model into a Triton model repository (Python backend)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Write a Triton model repository entry REPO/NAME (config.pbtxt and 1/model.py, Python backend)
for a checkpoint: 'policy' streams chat answers (decoupled), 'rm' scores conversations,
'ref' returns per-token log-probs. The checkpoint is referenced by its absolute path; --copy
copies it into NAME/1/checkpoint/ instead, so the repository can be moved to another machine
(its tritonserver's Python environment needs oatui installed). Serve it with 'oatui serve'.
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
                        help="rm/ref: largest batch per request and for dynamic batching (default 16)")
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
    from pathlib import Path

    from oatui.serve.repository import export_model, resolve_model
    from oatui.workspace import Workspace

    workspace = Workspace.open(args.workspace)
    model = resolve_model(args.model, workspace.root / "runs")
    repo = Path(args.repo).expanduser().absolute() if args.repo else workspace.triton_repo
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
    )
    verb = "replaced" if result.replaced else "wrote"
    print(f"{verb} {result.path} ({result.mode}, model {result.model_path})")
    return 0
