"""Export-tree loading, the usability / SFT / RM rules, `oatui data stats`, the chat format."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oatui.cli import main
from oatui.data.format import format_conversation, segments, tokenize_with_mask
from oatui.data.rules import compute_stats, rm_groups, sft_conversations
from oatui.data.sample import SAMPLE_FILE, write
from oatui.data.trees import load_trees

from helpers import run_oatui

DATA = Path(__file__).parent / "data"
EDGE = DATA / "edge_cases.trees.jsonl"
# Counted by hand from the comments in the file's trees (see tests/data/edge_cases.trees.jsonl):
# t1: P1 A1 A2 A3 P2 P3 A5 usable (A4 deleted with its subtree, A6 synthetic); 3 conversations
#     (P1-A1 with the trailing P2 dropped, P1-A2-P3-A5, P1-A3); one group {A1, A2}: A3 has no rank.
# t2 growing, t3 prompt rejected, t4 prompt deleted: not used.
# t5: a lone prompt: used, 1 message, no conversation.
# t6: A1 rejected (its subtree too); group {A2, A3, A4}: 3 pairs; 3 conversations.
# t7: synthetic prompt: the tree is used, none of its messages is.
# t8: a German prompt with an English answer A1 (rank 0) followed by two prompter leaves and a German
#     answer A2 (rank 1) followed by one: 6 messages (4 de, 2 en), 2 conversations (P1-A1 once, not
#     once per leaf; P1-A2), one group {A1, A2}.
EDGE_COUNTS = {
    "trees_total": 8,
    "trees": 5,
    "messages": 18,
    "sft_conversations": 8,
    "rm_groups": 3,
    "rm_pairs": 5,
    "languages": {"en": 7, "de": 6, "es": 4, "fr": 1},
}


def stats_json(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict | None, str]:
    code = main(["data", "stats", "--trees", str(path), "--json", *extra])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_edge_cases_are_counted_by_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    code, counts, _ = stats_json(EDGE, capsys)
    assert code == 0
    assert counts == EDGE_COUNTS
    assert list(counts) == list(EDGE_COUNTS)  # exactly these keys


def test_gzip_input_counts_the_same(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    packed = tmp_path / "edge.jsonl.gz"
    packed.write_bytes(gzip.compress(EDGE.read_bytes()))
    assert stats_json(packed, capsys)[1] == EDGE_COUNTS


def test_conversations_and_groups_of_the_edge_file() -> None:
    trees = {t.message_tree_id: t for t in load_trees(EDGE)}
    conversations = sft_conversations(trees["t1"])
    assert [[turn.text for turn in c.turns] for c in conversations] == [
        ["How do I boil an egg?", "Put it in boiling water for nine minutes."],
        ["How do I boil an egg?", "Boil it.", "Und auf Deutsch, bitte?", "Neun Minuten in kochendes Wasser. Grüße!"],
        ["How do I boil an egg?", "Eggs are great."],
    ]
    assert all(c.turns[-1].role == "assistant" for c in conversations)
    (group,) = rm_groups(trees["t6"])
    assert group.replies == ("No lo sé, lo siento.", "Mira el reloj.", "Es tarde.")
    assert group.pairs == [
        ("No lo sé, lo siento.", "Mira el reloj."),
        ("No lo sé, lo siento.", "Es tarde."),
        ("Mira el reloj.", "Es tarde."),
    ]
    assert sft_conversations(trees["t2"]) == [] and rm_groups(trees["t3"]) == []


def test_the_shipped_sample_is_what_the_generator_writes(tmp_path: Path) -> None:
    fresh = write(tmp_path / "sample.trees.jsonl.gz")
    assert fresh.read_bytes() == SAMPLE_FILE.read_bytes()
    stats = compute_stats(load_trees(SAMPLE_FILE))
    assert stats.trees_total >= 300 and stats.rm_groups > 300 and len(stats.languages) == 4


def test_malformed_line_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = EDGE.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # a line cut in half
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = stats_json(broken, capsys)
    assert code == 2
    assert err.count("\n") == 1 and f"{broken}:3: not valid JSON" in err

    code, counts, err = stats_json(broken, capsys, "--skip-invalid")
    assert code == 0 and counts["trees_total"] == 7 and "skipped 1 invalid lines" in err


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"message_tree_id": "x", "tree_state": "ready_for_export"}', "prompt: missing"),
        ('{"message_tree_id": "x", "tree_state": "ready_for_export", "prompt": {"message_id": "m", "text": "t", "role": "bot"}}',
         "prompt.role: expected 'prompter' or 'assistant'"),
        ('{"message_tree_id": "x", "tree_state": "ready_for_export", "prompt": {"message_id": "m", "text": "t", "role": "prompter", "replies": [{"message_id": "r", "text": 5, "role": "assistant"}]}}',
         "prompt.replies[0].text: expected a string"),
        ('{"message_tree_id": "x", "tree_state": "ready_for_export", "prompt": {"message_id": "m", "text": "t", "role": "prompter", "rank": true}}',
         "prompt.rank: expected an integer"),
        ("[1, 2]", "expected a message tree object"),
    ],
)
def test_schema_errors_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, problem: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n", encoding="utf-8")
    code, _, err = stats_json(bad, capsys)
    assert code == 2 and f"{bad}:1: {problem}" in err and err.count("\n") == 1


def test_cli_subprocess_bad_input_is_one_line_without_traceback(tmp_path: Path) -> None:
    missing = run_oatui("data", "stats", "--trees", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such file" in missing.stderr
    binary = tmp_path / "binary.jsonl.gz"
    binary.write_bytes(b"\x1f\x8b\x08\x00garbage")
    result = run_oatui("data", "stats", "--trees", str(binary))
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


SAMPLE_LINES = gzip.decompress(SAMPLE_FILE.read_bytes()).decode("utf-8").splitlines()[:20]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    line=st.integers(0, len(SAMPLE_LINES) - 1),
    position=st.floats(0, 1),
    action=st.sampled_from(["cut", "insert", "delete", "flip", "nul"]),
    junk=st.text(min_size=1, max_size=8),
)
def test_random_corruption_never_crashes(tmp_path: Path, capsys: pytest.CaptureFixture[str], line: int,
                                         position: float, action: str, junk: str) -> None:
    lines = list(SAMPLE_LINES)
    text = lines[line]
    at = int(position * len(text))
    if action == "cut":
        text = text[:at]
    elif action == "insert":
        text = text[:at] + junk + text[at:]
    elif action == "delete":
        text = text[:at] + text[at + len(junk):]
    elif action == "flip":
        text = text[:at] + junk[0] + text[at + 1:]
    else:
        text = text[:at] + "\x00" + text[at:]
    lines[line] = text
    path = tmp_path / "corrupt.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, counts, err = stats_json(path, capsys)
    if code == 0:
        assert counts is not None and counts["trees_total"] <= len(lines)
    else:
        assert code == 2 and err.count("\n") == 1 and f"{path}:" in err and "Traceback" not in err


def test_chat_format_and_assistant_mask() -> None:
    turns = [("prompter", "Hi"), ("assistant", "Hello!"), ("prompter", "Bye"), ("assistant", "See you.")]
    assert format_conversation(turns, "</s>", system="Be kind.") == (
        "<|system|>Be kind.</s><|prompter|>Hi</s><|assistant|>Hello!</s><|prompter|>Bye</s><|assistant|>See you.</s>"
    )
    assert format_conversation(turns[:1], "</s>", add_generation_prompt=True) == "<|prompter|>Hi</s><|assistant|>"

    class CharTokenizer:  # one id per character: enough to check which characters train
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": [ord(c) for c in text]}

    ids, mask = tokenize_with_mask(CharTokenizer(), segments(turns, "</s>"))
    trained = "".join(chr(i) for i, m in zip(ids, mask) if m)
    assert trained == "Hello!</s>See you.</s>"
    ids, mask = tokenize_with_mask(CharTokenizer(), segments(turns, "</s>"), max_length=10)
    assert len(ids) == len(mask) == 10


def test_rl_prompts_are_every_path_ending_with_a_prompter_turn() -> None:
    from oatui.data.rules import prompt_contexts

    trees = {t.message_tree_id: t for t in load_trees(EDGE)}

    def texts(tree: str) -> list[list[str]]:
        return [[turn.text for turn in context] for context in prompt_contexts(trees[tree])]

    assert texts("t1") == [
        ["How do I boil an egg?"],
        ["How do I boil an egg?", "Put it in boiling water for nine minutes.", "Thanks!"],  # not answered yet
        ["How do I boil an egg?", "Boil it.", "Und auf Deutsch, bitte?"],
    ]
    assert texts("t5") == [["Ça va ? 日本語のテキスト 🙂"]]  # a lone prompt is a prompt
    assert texts("t6") == [["¿Qué hora es?"]]  # the follow-up lies under a rejected answer
    assert texts("t2") == texts("t3") == texts("t7") == []


def test_prompt_mix_reads_exports_and_plain_prompt_files(tmp_path: Path) -> None:
    from oatui.config import DatasetSpec
    from oatui.data.datasets import prompt_mix
    from oatui.errors import UserError

    plain = tmp_path / "prompts.jsonl.gz"
    plain.write_bytes(gzip.compress(b'{"prompt": "Tell me a joke."}\n\n{"prompt": "What is 2+2?"}\n'))
    empty_feedback = tmp_path / "data" / "feedback.trees.jsonl"
    empty_feedback.parent.mkdir()
    empty_feedback.write_text("")
    specs = [DatasetSpec(path=str(EDGE)), DatasetSpec(path=plain.name), DatasetSpec(path="feedback")]
    mix = prompt_mix(specs, tmp_path, seed=1, val_fraction=0.0)
    assert sorted(context[-1].text for context in mix.train) == sorted([
        "How do I boil an egg?", "Thanks!", "Und auf Deutsch, bitte?", "Ça va ? 日本語のテキスト 🙂", "¿Qué hora es?",
        "Wie spät ist es?", "Danke!", "Thanks!", "Danke.", "Tell me a joke.", "What is 2+2?",
    ])
    assert [(s.path, s.used, s.trees) for s in mix.sources] == [(str(EDGE), 9, 5), ("prompts.jsonl.gz", 2, 0), ("feedback", 0, 0)]

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": ""}\n{"prompt": "fine"}\n')
    with pytest.raises(UserError, match=f"^{broken}:2: expected an object with a non-empty string 'prompt'$"):
        prompt_mix([DatasetSpec(path=str(broken))], tmp_path, seed=1, val_fraction=0.0)
    lenient = prompt_mix([DatasetSpec(path=str(broken))], tmp_path, seed=1, val_fraction=0.0, skip_invalid=True)
    assert sorted(c[0].text for c in lenient.train) == ["fine", "ok"] and lenient.sources[0].skipped_lines == 1
    with pytest.raises(UserError, match="^prompts: no training examples in feedback$"):
        prompt_mix([DatasetSpec(path="feedback")], tmp_path, seed=1, val_fraction=0.0)
