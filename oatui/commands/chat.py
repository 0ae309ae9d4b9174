"""`oatui chat`: streamed answers from the served policy model, in the terminal."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from oatui.errors import UserError

DEFAULT_URL = "127.0.0.1:8001"

DESCRIPTION = """\
Stream the served policy's answer to PROMPT; with no PROMPT, chat turn by turn (the whole
conversation goes with each question; an empty line or Ctrl-D ends, Ctrl-C stops an answer).
The server is --url, else the one 'oatui serve --detach' runs for this workspace, else
127.0.0.1:8001.

With --rank K, K answers are sampled (different seeds, generated at once: the first streams, the
others follow as far as they have come) and you put them in order; each ranking is
appended to WORKSPACE/data/feedback.trees.jsonl as an export tree, which the 'feedback' dataset
of the SFT and RM configs reads (an edited answer becomes a demonstration).

With --ab MODEL_A MODEL_B, a blind A/B judge: both models answer each prompt at once, shown as A
and B in an order drawn at random per round; you answer a (A is better), b, t (tie) or s (skip),
then the order is revealed. Each choice is appended to the same feedback file (both model names
recorded; a tie is saved unranked, so it makes no RM pair), and the pair's win rate so far,
counted from that file, is printed after every choice.

'oatui chat export [--out FILE]' writes the app's chat history as export trees.
"""


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "chat",
        parents=parents,
        help="chat with the served policy model",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", nargs="?", metavar="PROMPT", help="one question (default: an interactive chat)")
    parser.add_argument("--url", metavar="HOST:GRPCPORT", help="the server's gRPC address")
    parser.add_argument("--model", default="policy", help="model name on the server (default policy)")
    parser.add_argument("--system", metavar="TEXT", help="a system message placed before the conversation")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="longest answer in tokens (server default 256)")
    parser.add_argument("--temperature", type=float, metavar="T", help="0 for greedy (server default 1.0)")
    parser.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling (server default 1.0: off)")
    parser.add_argument("--top-k", type=int, metavar="K", help="top-k sampling (server default 0: off)")
    parser.add_argument("--repetition-penalty", type=float, metavar="R", help="above 1 discourages repeats")
    parser.add_argument("--seed", type=int, metavar="S", help="seed for a repeatable answer")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="longest wait for each piece of the answer (default 30)")
    parser.add_argument("--rank", type=int, metavar="K",
                        help="sample K answers (seeds S, S+1, ...) and rank them into feedback data")
    parser.add_argument("--ab", nargs=2, metavar=("MODEL_A", "MODEL_B"),
                        help="blind A/B: both models answer, you pick the better one (or a tie) into feedback data")
    parser.add_argument("--lang", default="en", metavar="CODE",
                        help="language code recorded with rankings and exports (default en)")
    parser.add_argument("--out", metavar="FILE",
                        help="with 'export': the file to write (default WORKSPACE/data/chats.trees.jsonl)")
    parser.add_argument("--as-demonstrations", action="store_true",
                        help="with 'export': mark the model's answers as not synthetic, so SFT trains on them")
    parser.set_defaults(func=run)


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The request parameters the options ask for (left out: the server's defaults)."""
    values = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }
    return {key: value for key, value in values.items() if value is not None}


def default_url(workspace_path: str | None) -> str:
    """The detached server's gRPC address for this workspace, if one runs; else 127.0.0.1:8001."""
    from oatui.serve.server import status
    from oatui.workspace import Workspace

    info = status(Workspace.open(workspace_path))
    if info is not None and info.admin_key_file:
        # It restricts model configs (the EOS token) to its key: ours, since we started it.
        from oatui.serve.client import ADMIN_KEY_ENV
        from oatui.serve.ports import read_admin_key

        with contextlib.suppress(OSError):
            os.environ.setdefault(ADMIN_KEY_ENV, read_admin_key(info.admin_key_file))
    return info.grpc_url if info is not None else DEFAULT_URL


def served_runs(workspace_path: str | None, url: str, models: Sequence[str]) -> dict[str, str | None]:
    """The training run behind each of ``models``, when ``url`` is this workspace's server and its
    record knows (the export records it); otherwise none."""
    from oatui.serve.server import status
    from oatui.workspace import Workspace

    info = status(Workspace.open(workspace_path))
    if info is None or info.grpc_url != url:
        return {}
    return {model: info.model_source(model).run_id for model in models}


def print_stream(pieces: Iterator[str], out: TextIO) -> str:
    """Write pieces as they come; returns the whole answer."""
    answer = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        answer.append(piece)
    return "".join(answer)


def answer_turns(client: Any, turns: Sequence[tuple[str, str]], system: str | None, sampling: dict[str, Any],
                 out: TextIO) -> str:
    """Stream the answer to a conversation (``(role, text)`` turns ending with the prompter's)."""
    return print_stream(client.stream(turns=list(turns), system=system, **sampling), out)


def interactive(client: Any, system: str | None, sampling: dict[str, Any], out: TextIO,
                read: Callable[[str], str] = input) -> None:
    turns: list[tuple[str, str]] = []
    while True:
        try:
            question = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not question.strip():
            return
        turns.append(("prompter", question))
        out.write("assistant> ")
        out.flush()
        pieces: list[str] = []
        try:
            for piece in client.stream(turns=list(turns), system=system, **sampling):
                out.write(piece)
                out.flush()
                pieces.append(piece)
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        # What was shown stays in the conversation, a stopped answer included.
        turns.append(("assistant", "".join(pieces)))


def export_chats(args: argparse.Namespace) -> int:
    from oatui.chat.exporting import export_history
    from oatui.chat.history import ChatHistory
    from oatui.workspace import Workspace

    workspace = Workspace.open(args.workspace)
    out = Path(args.out) if args.out else workspace.data / "chats.trees.jsonl"
    count = export_history(ChatHistory(workspace.chat_db), out, args.lang, args.as_demonstrations)
    print(f"{count} conversations written to {out}", file=sys.stderr)
    return 0


def rank_answers(client: Any, turns: Sequence[tuple[str, str]], count: int, args: argparse.Namespace,
                 sampling: dict[str, Any], out: TextIO, read: Callable[[str], str] = input,
                 more_clients: Sequence[Any] = (), model_name: str | None = None) -> str | None:
    """Sample ``count`` answers, ask for their order, append the ranking; returns the best answer.

    With ``count - 1`` ``more_clients`` the answers are generated at once (the server decodes them
    together), the first shown as it streams; otherwise one after another through ``client``.
    The answers' ``model_name`` is ``model_name`` (the run behind the served model), else ``args.model``.
    """
    from oatui.chat.feedback import save_ranking
    from oatui.chat.ranking import HELP, parse_order
    from oatui.workspace import Workspace

    base_seed = sampling.pop("seed", 0)
    seeds = [base_seed + i for i in range(count)]
    headings = [f"--- answer {number} (seed {seed}) ---" for number, seed in enumerate(seeds, 1)]
    texts = []
    if len(more_clients) >= count - 1:
        texts = stream_many([client, *more_clients[: count - 1]], turns, args.system,
                            [{**sampling, "seed": seed} for seed in seeds], headings, out)
    else:
        for heading, seed in zip(headings, seeds):
            out.write(f"{heading}\n")
            texts.append(answer_turns(client, turns, args.system, {**sampling, "seed": seed}, out).strip())
            out.write("\n")
    edits: dict[int, str] = {}
    while True:
        try:
            reply = read(f"rank ({HELP}): ").strip()
        except EOFError:  # Ctrl-D, or the end of piped input: as a skip
            reply = "skip"
            out.write("\n")
        if reply.lower() in ("s", "skip"):
            out.write("skipped: nothing saved\n")
            return None
        if reply.lower().startswith("e") and reply[1:].strip().isdigit():
            index = int(reply[1:]) - 1
            if not 0 <= index < count:
                out.write(f"no answer {index + 1}\n")
                continue
            try:
                edited = read(f"new text for answer {index + 1}: ").strip()
            except EOFError:
                edited = ""
                out.write("\n")
            if edited:
                edits[index] = edited
                out.write(f"answer {index + 1} edited\n")
            continue
        try:
            order = parse_order(reply, count)
        except ValueError as error:
            out.write(f"{error}\n")
            continue
        break
    workspace = Workspace.open(args.workspace)
    save_ranking(workspace.feedback_file, turns, texts, order, edits=edits, seeds=seeds, model=args.model,
                 run=model_name, lang=args.lang, system=args.system)
    out.write(f"saved to {workspace.feedback_file}: {len(order.ranked)} ranked, {len(order.rejected)} rejected\n")
    best = order.ranked[0]
    return edits.get(best, texts[best])


def stream_both(clients: Sequence[Any], turns: Sequence[tuple[str, str]], system: str | None,
                sampling: dict[str, Any], out: TextIO) -> tuple[str, str]:
    """Generate two answers at once (one thread per client); show A's as it streams, then B's.

    Returns both answers. An error of either stream is raised once both have ended; Ctrl-C
    cancels both on the server.
    """
    first, second = stream_many(clients, turns, system, [sampling, sampling], ["--- A ---", "--- B ---"], out)
    return first, second


def stream_many(clients: Sequence[Any], turns: Sequence[tuple[str, str]], system: str | None,
                samplings: Sequence[dict[str, Any]], headings: Sequence[str], out: TextIO) -> list[str]:
    """Generate one answer per client at once (one thread each: the server decodes them together);
    show the first as it streams, then each next one under its heading as far as it has come.

    Returns the answers, stripped. An error of any stream is raised once all have ended; Ctrl-C
    cancels them all on the server.
    """
    import queue

    streams: list[queue.Queue[tuple[str, Any]]] = [queue.Queue() for _ in clients]

    def produce(client: Any, sampling: dict[str, Any], target: queue.Queue[tuple[str, Any]]) -> None:
        try:
            for piece in client.stream(turns=list(turns), system=system, **sampling):
                target.put(("piece", piece))
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            target.put(("error", error))
        else:
            target.put(("end", None))

    threads = [threading.Thread(target=produce, args=(client, sampling, target), daemon=True)
               for client, sampling, target in zip(clients, samplings, streams)]
    for thread in threads:
        thread.start()
    texts: list[str] = []
    failure: BaseException | None = None
    try:
        for heading, target in zip(headings, streams):
            out.write(f"{heading}\n")
            out.flush()
            pieces: list[str] = []
            while True:
                kind, value = target.get()
                if kind == "piece":
                    out.write(value)
                    out.flush()
                    pieces.append(value)
                    continue
                if kind == "error" and failure is None:
                    failure = value
                break
            out.write("\n")
            texts.append("".join(pieces).strip())
    except KeyboardInterrupt:
        for client in clients:
            client.cancel()
        raise
    finally:
        for thread in threads:
            thread.join(timeout=5)
    if failure is not None:
        raise failure
    return texts


def ab_round(clients: dict[str, Any], turns: Sequence[tuple[str, str]], context_models: Sequence[str | None],
             args: argparse.Namespace, sampling: dict[str, Any], out: TextIO,
             read: Callable[[str], str] = input, runs: dict[str, str | None] | None = None) -> tuple[str, str] | None:
    """One blind round: both answers, the person's choice, the tree appended and the order revealed.

    Returns the answer the conversation goes on from and its model, or None when skipped. ``runs``:
    the training run behind each served model, where known, to name its answers.
    """
    from oatui.chat.ab import HELP, ABRound, append_round, pair_tally, parse_choice, shown_order
    from oatui.workspace import Workspace

    models = shown_order(*args.ab)
    # One seed for both answers (--seed, else a fresh one per round): only the model differs.
    sampling = {**sampling, "seed": sampling.get("seed", random.randrange(2**31))}
    try:
        texts = stream_both([clients[models[0]], clients[models[1]]], turns, args.system, sampling, out)
    except KeyboardInterrupt:
        out.write("\n[stopped: nothing saved]\n")
        return None
    while True:
        try:
            choice = parse_choice(read(f"which is better? ({HELP}): "))
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, the end of piped input or Ctrl-C: as a skip
            choice = "skip"
            out.write("\n")
        if choice is not None:
            break
        out.write(f"expected one of: {HELP}\n")
    reveal = f"A was {models[0]}, B was {models[1]}"
    if choice == "skip":
        out.write(f"skipped: nothing saved ({reveal})\n")
        return None
    workspace = Workspace.open(args.workspace)
    ab = ABRound(context=list(turns), models=models, texts=texts, choice=choice, lang=args.lang,
                 system=args.system, context_models=list(context_models),
                 runs=((runs or {}).get(models[0]), (runs or {}).get(models[1])))
    append_round(workspace.feedback_file, ab)
    verdict = "a tie" if ab.winner is None else f"{choice} ({ab.winner})"
    out.write(f"{reveal}: you chose {verdict}; saved to {workspace.feedback_file}\n")
    out.write(f"so far: {pair_tally(workspace.feedback_file, *args.ab).describe()}\n")
    return ab.kept_text, ab.kept_model


def run_ab(args: argparse.Namespace, url: str, sampling: dict[str, Any]) -> None:
    """``--ab``: blind rounds on PROMPT, or turn by turn, the conversation going on from each choice."""
    from oatui.chat.ab import pair_tally
    from oatui.serve.client import ChatClient
    from oatui.workspace import Workspace

    clients = {model: ChatClient(url, model=model, timeout=args.timeout) for model in args.ab}
    try:
        for client in clients.values():
            client.eos_token()  # both models are there, before any prompt (else one line, exit 2)
        runs = served_runs(args.workspace, url, args.ab)
        tally = pair_tally(Workspace.open(args.workspace).feedback_file, *args.ab)
        print(f"blind A/B of {args.ab[0]} and {args.ab[1]} at {url}"
              + (f"; so far: {tally.describe()}" if tally.rounds else ""), file=sys.stderr)
        turns: list[tuple[str, str]] = []
        context_models: list[str | None] = []
        question = args.prompt
        while True:
            if question is None:
                try:
                    question = input("you> ")
                except (EOFError, KeyboardInterrupt):
                    break
            if not question.strip():
                if args.prompt is not None:
                    from oatui.errors import UserError

                    raise UserError("PROMPT is empty")
                break
            turns.append(("prompter", question))
            context_models.append(None)
            kept = ab_round(clients, turns, context_models, args, dict(sampling), sys.stdout, runs=runs)
            if args.prompt is not None:
                break
            if kept is None:
                turns.pop()
                context_models.pop()
            else:
                turns.append(("assistant", kept[0]))  # the conversation goes on from the chosen answer
                context_models.append(kept[1])
            question = None
    finally:
        for client in clients.values():
            client.close()


def run(args: argparse.Namespace) -> int:
    from oatui.serve.client import ChatClient, RemoteError, ServerUnavailable

    if args.prompt == "export" and args.rank is None and args.ab is None:
        return export_chats(args)
    if args.rank is not None and not 2 <= args.rank <= 9:
        raise UserError(f"--rank {args.rank}: rank between 2 and 9 answers")
    if args.ab is not None:
        if args.rank is not None:
            raise UserError("--ab and --rank: choose one (A/B compares two models, --rank one model's answers)")
        if args.ab[0] == args.ab[1] or not all(name.strip() for name in args.ab):
            raise UserError(f"--ab {' '.join(args.ab)}: name two different models")
    url = args.url or default_url(args.workspace)
    sampling = sampling_from_args(args)
    if args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout:g}: must be above 0")
    if args.ab is not None:
        try:
            run_ab(args, url, sampling)
        except ValueError as error:
            raise UserError(str(error)) from None
        except (ServerUnavailable, RemoteError) as error:
            sys.stdout.flush()
            raise UserError(str(error)) from None
        return 0
    client = ChatClient(url, model=args.model, timeout=args.timeout)
    # --rank K: one client per answer, so that the K answers are generated at once.
    more_clients = [ChatClient(url, model=args.model, timeout=args.timeout) for _ in range((args.rank or 1) - 1)]
    try:
        if args.rank is not None:
            # The rankings name the run behind the served model, when the server's record knows it.
            model_run = served_runs(args.workspace, url, [args.model]).get(args.model)
            turns: list[tuple[str, str]] = []
            question = args.prompt
            while True:
                if question is None:
                    try:
                        question = input("you> ")
                    except (EOFError, KeyboardInterrupt):
                        break
                if not question.strip():
                    break
                turns.append(("prompter", question))
                best = rank_answers(client, turns, args.rank, args, dict(sampling), sys.stdout,
                                    more_clients=more_clients, model_name=model_run)
                if args.prompt is not None:
                    break
                if best is None:
                    turns.pop()
                else:
                    turns.append(("assistant", best))  # the conversation goes on from the best answer
                question = None
        elif args.prompt is not None:
            if not args.prompt.strip():
                raise UserError("PROMPT is empty")
            print_stream(client.stream(prompt=args.prompt, system=args.system, **sampling), sys.stdout)
            sys.stdout.write("\n")
        else:
            print(f"chatting with {args.model} at {url}; an empty line or Ctrl-D ends, Ctrl-C stops an answer",
                  file=sys.stderr)
            interactive(client, args.system, sampling, sys.stdout)
    except ValueError as error:
        raise UserError(str(error)) from None
    except (ServerUnavailable, RemoteError) as error:
        sys.stdout.flush()
        raise UserError(str(error)) from None
    finally:
        client.close()
        for other in more_clients:
            other.close()
    return 0
