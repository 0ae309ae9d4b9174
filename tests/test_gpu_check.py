"""bench/gpu_check.sh on a machine without a GPU, the commands its steps run, and the small options
it needed (export --instance-kind, bench_serve.py --device, the tiny model's padded_vocab_size)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_oatui

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def readme_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Checking a GPU machine")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def run_script(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this is the no-GPU path on every machine.
    env = dict(os.environ, OUT=str(out), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(ROOT), stdin=subprocess.DEVNULL)


def test_without_a_gpu_it_says_so_skips_the_gpu_steps_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_script(out=out)
    assert done.returncode == 0, done.stdout + done.stderr
    said = [line for line in done.stdout.splitlines() if "no CUDA GPU here" in line]
    assert len(said) == 1, done.stdout
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")]
            for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| step")}
    assert list(rows) == list(gpu_check.STEP_NAMES)
    for step in gpu_check.STEPS:
        status, detail = rows[step.name][1], rows[step.name][4]
        if step.needs_gpu:
            assert (status, detail) == ("skipped", "no CUDA GPU"), rows[step.name]
        else:
            assert status == "ok", rows[step.name]
    assert re.search(r"^2 ok, 0 failed, \d+ skipped$", done.stdout, re.MULTILINE)

    # Everything under $OUT: the table, each step's command and result, the logs, the snapshot.
    assert (out / "summary.md").read_text().startswith("GPU check: no CUDA GPU")
    steps = json.loads((out / "steps.json").read_text())
    assert steps["gpu"] is False
    assert [step["name"] for step in steps["steps"]] == list(gpu_check.STEP_NAMES)
    environment = json.loads((out / "environment.json").read_text())
    assert environment["cuda_available"] is False and environment["torch"]
    snapshot = json.loads((out / "gpus.json").read_text().splitlines()[0])
    assert snapshot["gpus"] == [] and snapshot["notice"]
    for step in steps["steps"][:2]:
        assert (out / step["log"]).is_file()
        assert step["run_as"].endswith(step["command"].split("bin/", 1)[1].replace("$OUT", str(out)))


def test_every_step_runs_the_command_the_readme_documents(tmp_path: Path) -> None:
    section = readme_section()
    commands = [line.strip() for line in re.search(r"```sh\n# environment.*?```", section, re.S).group(0).splitlines()
                if line.strip() and not line.startswith(("```", "#"))]
    assert commands == [step.command for step in gpu_check.STEPS]
    listed = run_script("--list", out=tmp_path / "out")
    assert listed.returncode == 0, listed.stderr
    for step in gpu_check.STEPS:
        assert step.command in listed.stdout
    assert not (tmp_path / "out").exists(), "--list runs nothing and writes nothing"


def test_the_readme_kernel_and_monitoring_sections_name_the_script() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for title in ("## GPU monitoring", "## The kernel: fused KL-penalised reward and GAE"):
        start = text.index(title)
        assert "bench/gpu_check.sh" in text[start:text.index("\n## ", start + 1)], title


@pytest.mark.parametrize("args, named", [
    (["--only", "kernel-exact", "nosuch"], "--only nosuch"),
    (["--budget", "-3"], "--budget"),
    (["--bogus"], "--bogus"),
    (["compare-served"], "--url"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path: Path, args: list[str], named: str) -> None:
    done = run_script(*args, out=tmp_path / "out")
    assert done.returncode == 2, done.stdout
    assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_an_out_folder_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder\n")
    done = run_script(out=tmp_path / "file" / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and f"OUT={tmp_path / 'file' / 'out'}" in done.stderr


def test_only_runs_the_steps_named_and_pack_leaves_few_files(tmp_path: Path) -> None:
    import tarfile

    out = tmp_path / "out"
    done = run_script("--only", "gpus", "--pack", out=out)
    assert done.returncode == 0, done.stderr
    steps = {step["name"]: step for step in json.loads((out / "steps.json").read_text())["steps"]}
    assert steps["environment"]["status"] == "ok", "the environment always runs: it decides GPU or not"
    assert steps["gpus"]["status"] == "ok"
    assert steps["kernel-bench"]["detail"] == "not in --only"
    assert sorted(p.name for p in out.iterdir()) == ["environment.json", "gpus.json", "logs.tar.gz", "steps.json",
                                                     "summary.md"]
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert sorted(archive.getnames()) == ["logs", "logs/01-environment.log", "logs/02-gpus.log"]
    assert steps["gpus"]["log"] == "logs.tar.gz:logs/02-gpus.log"


def test_each_step_has_its_own_time_limit_and_the_next_one_runs(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """The machinery of the GPU steps, with stand-in commands: a step that hangs is stopped at its
    limit, a failing one says why in one line, a step that needs a failed one is skipped, the rest
    run, and the check itself ends 0 with the table."""
    scripts = {
        "facts.py": "import json; json.dump({'cuda_available': True, 'gpu_name': 'stand-in GPU'}, "
                    "open('environment.json', 'w'))",
        "hangs.py": "import time; time.sleep(60)",
        "breaks.py": "import sys; print('boom: bad thing', file=sys.stderr); sys.exit(3)",
        "works.py": "print(42)",
    }
    for name, text in scripts.items():
        (tmp_path / name).write_text(text + "\n")
    python = shlex.quote(sys.executable)

    def run(name: str) -> str:
        return f"{python} {shlex.quote(str(tmp_path / name))}"

    Step = gpu_check.Step
    steps = (
        Step("environment", "facts", run("facts.py"), 30, needs_gpu=False),
        Step("hangs", "a step that never ends", run("hangs.py"), 1),
        Step("breaks", "a step that fails", run("breaks.py"), 30),
        Step("after-hangs", "needs hangs", run("works.py"), 30, needs=("hangs",)),
        Step("fine", "a step that works", run("works.py") + " > $OUT/fine.txt", 30),
    )
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    monkeypatch.setattr(gpu_check, "STEP_NAMES", tuple(step.name for step in steps))
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path / "out")  # the steps run in $OUT, where the stand-in writes
    monkeypatch.setitem(gpu_check.SUMMARIES, "environment", lambda result, runner: "stand-in")
    (tmp_path / "out").mkdir()
    runner = gpu_check.Runner(tmp_path / "out", budget=120, only=None)
    assert runner.main() == 0
    results = {name: result for name, result in runner.results.items()}
    assert runner.has_gpu
    assert (results["hangs"].status, results["hangs"].detail.split(";")[0]) == ("failed", "timed out after 1 s")
    assert results["hangs"].seconds < 30
    assert (results["breaks"].status, results["breaks"].detail) == ("failed", "exit 3: boom: bad thing")
    assert (results["after-hangs"].status, results["after-hangs"].detail) == ("skipped", "needs hangs (not ok)")
    assert results["fine"].status == "ok" and (tmp_path / "out" / "fine.txt").read_text() == "42\n"
    printed = capsys.readouterr().out
    assert "| hangs | failed |" in printed and "2 ok, 2 failed, 1 skipped" in printed

    # A spent budget skips what is left, saying so.
    runner = gpu_check.Runner(tmp_path / "out", budget=4, only=None)
    runner.main()
    assert runner.results["fine"].detail == "the time budget is spent"


def test_a_step_command_is_filled_in_with_its_environment_and_output_file() -> None:
    rl = next(step for step in gpu_check.STEPS if step.name == "rl")
    env, argv, stdout = gpu_check.expand(rl.command, {"GRPC": "8123"})
    assert env == {"TRITON_HOST_RM": "127.0.0.1:8123/rm", "TRITON_HOST_REF": "127.0.0.1:8123/ref"}
    assert argv[1:] == ["train", "rl", "--configs", "defaults_rl", "gpu-check-rl"] and stdout is None
    gpus = next(step for step in gpu_check.STEPS if step.name == "gpus")
    env, argv, stdout = gpu_check.expand(gpus.command, {"OUT": "/x"})
    assert argv[1:] == ["gpus", "--json"] and stdout == "/x/gpus.json"
    chat = next(step for step in gpu_check.STEPS if step.name == "chat")
    assert gpu_check.expand(chat.command, {"GRPC": "1"})[1][-1] == gpu_check.CHAT_PROMPT
    with pytest.raises(gpu_check.StepFailed, match="SFT_RUN"):
        gpu_check.expand("oatui export --model $SFT_RUN", {})


def test_step_summaries_read_the_outputs_of_gpu_runs(tmp_path: Path) -> None:
    """The parts that read what GPU steps print, on outputs shaped like theirs."""
    runner = gpu_check.Runner(tmp_path, budget=60, only=None)
    (tmp_path / "logs").mkdir()
    bench = next(step for step in gpu_check.STEPS if step.name == "kernel-bench")
    result = gpu_check.Result(bench, log="logs/kernel.log")
    (tmp_path / result.log).write_text(
        "# device: NVIDIA H100 80GB HBM3, torch 2.13.0\n"
        "| shape | classic ms | ours (triton) ms | speedup | torch path ms | triton GB/s | copy GB/s | of copy |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        "| 512x4096 | 250.0 | 0.10 | 2500× | 1.20 | 1750 | 2900 | 60% |\n")
    assert gpu_check.SUMMARIES["kernel-bench"](result, runner).startswith(
        "512x4096: triton 0.10 ms, 1750 GB/s = 60% of a copy (2900 GB/s), 2500× the classic loop")

    serve = next(step for step in gpu_check.STEPS if step.name == "serve")
    server_log = tmp_path / "tritonserver.log"
    lines = [f"I1128 python_be.cc] oatui {model} {model}: /ws/runs/x/final on {device}, context 2048 tokens"
             for model, device in (("policy", "cuda:0"), ("rm", "cuda:0"), ("ref", "cpu"))]
    server_log.write_text("\n".join(lines) + "\n")
    result = gpu_check.Result(serve, log="logs/serve.log")
    (tmp_path / result.log).write_text(f"tritonserver 7 ready: gRPC 127.0.0.1:1; models policy, rm, ref; log {server_log}\n")
    with pytest.raises(gpu_check.StepFailed, match="ref on cpu"):
        gpu_check.SUMMARIES["serve"](result, runner)
    server_log.write_text(server_log.read_text().replace("on cpu", "on cuda:0"))
    assert "policy on cuda:0, rm on cuda:0, ref on cuda:0" in gpu_check.SUMMARIES["serve"](result, runner)

    bench = next(step for step in gpu_check.STEPS if step.name == "serve-bench")
    result = gpu_check.Result(bench, log="logs/serve-bench.log")
    (tmp_path / result.log).write_text(
        "Triton answers equal to the in-process loop's (same seeds): 16/16\n"
        "Triton vs in-process loop: first token +1.6 ms, throughput 1.02x (after the first token 1.03x)\n"
        "| streams | batched tokens/s | per stream | first token p50 / p95 | one at a time tokens/s "
        "| first token p50 / p95 | batched vs 1 stream | batched vs one at a time |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| 1 | 877 | 870 | 2.9 / 4.0 ms | 860 | 3.0 / 4.2 ms | 1.00x | 1.02x |\n"
        "| 4 | 3024 | 757 | 9.2 / 12.5 ms | 901 | 80.1 / 99.0 ms | 3.45x | 3.36x |\n")
    assert gpu_check.SUMMARIES["serve-bench"](result, runner) == (
        "first token +1.6 ms, throughput 1.02x (after the first token 1.03x); answers equal 16/16; "
        "4 streams at once: 3024 tokens/s in all (3.45x one stream, 3.36x one request at a time), "
        "first token 9.2 ms (p95 12.5 ms)")

    # The monitor's steps, on the synthesised 8×H100 recording.
    recording = ROOT / "tests" / "data" / "recordings" / "8xh100.jsonl"
    runner.has_gpu = True
    (tmp_path / "gpus.json").write_text(recording.read_text().splitlines()[0] + "\n")
    (tmp_path / "gpus-recording.jsonl").write_text(recording.read_text())
    steps = {step.name: step for step in gpu_check.STEPS}
    assert gpu_check.SUMMARIES["gpus"](gpu_check.Result(steps["gpus"]), runner).startswith(
        "8 GPU(s), NVIDIA H100 80GB HBM3")
    assert gpu_check.SUMMARIES["gpus-recording"](gpu_check.Result(steps["gpus-recording"]), runner).startswith(
        "60 snapshots in gpus-recording.jsonl")
    (tmp_path / "gpus.json").write_text(json.dumps({"gpus": [], "notice": "No NVIDIA driver found"}) + "\n")
    with pytest.raises(gpu_check.StepFailed, match="no GPU in the snapshot"):
        gpu_check.SUMMARIES["gpus"](gpu_check.Result(steps["gpus"]), runner)


def test_export_instance_kind_gpu_writes_kind_gpu(tmp_path: Path) -> None:
    from oatui.models.tiny import ensure_tiny_model

    model = ensure_tiny_model(tmp_path / "models", {"hidden_size": 32, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "intermediate_size": 64})
    workspace = tmp_path / "ws"
    done = run_oatui("export", "--mode", "rm", "--model", str(model), "--instance-kind", "gpu", workspace=workspace)
    assert done.returncode == 0, done.stderr
    config = (workspace / "triton" / "rm" / "config.pbtxt").read_text()
    assert "instance_group [ { kind: KIND_GPU count: 1 } ]" in config
    done = run_oatui("export", "--mode", "ref", "--model", str(model), workspace=workspace)
    assert "instance_group [ { kind: KIND_MODEL count: 1 } ]" in (workspace / "triton" / "ref" / "config.pbtxt").read_text()
    done = run_oatui("export", "--mode", "policy", "--model", str(model), "--instance-kind", "gpu", "--device", "cpu",
                     workspace=workspace)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "--instance-kind gpu" in done.stderr and "--device cpu" in done.stderr
    assert not (workspace / "triton" / "policy").exists()


def test_tiny_model_padded_vocab_size(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from oatui.errors import UserError
    from oatui.models.tiny import TINY_SHAPE, ensure_tiny_model

    shape = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    plain = ensure_tiny_model(tmp_path, shape)
    padded = ensure_tiny_model(tmp_path, {**shape, "padded_vocab_size": 3000})
    assert padded != plain
    assert AutoConfig.from_pretrained(padded).vocab_size == 3008  # rounded up to a multiple of 64
    assert AutoConfig.from_pretrained(plain).vocab_size < TINY_SHAPE["vocab_size"]
    with pytest.raises(UserError, match="padded_vocab_size"):
        ensure_tiny_model(tmp_path, {"vocab_sise": 10})


@pytest.mark.parametrize("args, named", [
    (["--device", "tpu"], "--device"), (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "1", "--repeats", "0"], "--repeats"), (["--repeats", "2"], "--concurrency"),
    (["--concurrency", "1", "--baseline-tree", "/nonexistent"], "--baseline-tree")])
def test_bench_serve_options(args: list[str], named: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_serve.py"), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and named in done.stderr.splitlines()[-1]
