"""Open-Assistant's dataset-entry filters (``lang``, ``top_k``) and SFT conversations counted once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oatui.cli import main
from oatui.config import DatasetSpec, load_stage_config
from oatui.data.datasets import prompt_mix, rm_mix, sft_mix
from oatui.data.rules import compute_stats, rm_groups, sft_conversations
from oatui.data.trees import load_trees
from oatui.errors import UserError

EDGE = Path(__file__).parent / "data" / "edge_cases.trees.jsonl"


def texts(conversations) -> list[list[str]]:  # noqa: ANN001
    return [[turn.text for turn in conversation.turns] for conversation in conversations]


@pytest.fixture(scope="module")
def trees() -> dict:
    return {tree.message_tree_id: tree for tree in load_trees(EDGE)}


def test_an_answer_with_several_prompter_leaves_is_one_conversation(trees: dict) -> None:
    # t8: A1 has two prompter leaves ("Danke!", "Thanks!"), A2 one ("Danke.").
    assert texts(sft_conversations(trees["t8"])) == [
        ["Wie spät ist es?", "It is noon."],
        ["Wie spät ist es?", "Mittag."],
    ]
    # Distinct paths in the whole file, and data stats counts each once.
    every = [tuple(c.turns) for tree in trees.values() for c in sft_conversations(tree)]
    assert len(every) == len(set(every)) == compute_stats(trees.values()).sft_conversations == 8


def test_lang_keeps_trees_by_their_prompt_language(trees: dict, capsys: pytest.CaptureFixture[str]) -> None:
    def stats(*extra: str) -> dict:
        assert main(["data", "stats", "--trees", str(EDGE), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    # t8's prompt is German, its answer A1 and one follow-up English: the tree is in under de only,
    # with every message whatever its language.
    assert stats("--lang", "de") == {"trees_total": 8, "trees": 1, "messages": 6, "sft_conversations": 2,
                                     "rm_groups": 1, "rm_pairs": 1, "languages": {"de": 4, "en": 2}}
    # t1's prompt is English, its follow-up and the answer to it German: kept under en, German turns
    # included (t7, English too, is used but has no usable message).
    english = stats("--lang", "en")
    assert (english["trees"], english["sft_conversations"], english["languages"]) == (2, 3, {"en": 5, "de": 2})
    assert stats("--lang", "en,es,fr")["trees"] == 4
    assert stats("--lang", "xx")["trees"] == 0
    assert stats()["trees"] == 5

    with pytest.raises(SystemExit) as exited:
        main(["data", "stats", "--trees", str(EDGE), "--lang", "en,,de"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lang" in err


def test_lang_on_a_dataset_entry_applies_to_sft_rm_and_rl(tmp_path: Path) -> None:
    german = [DatasetSpec(path=str(EDGE), lang=["de"])]
    sft = sft_mix(german, tmp_path, seed=1, val_fraction=0.0)
    assert sorted(c.turns[-1].text for c in sft.train) == ["It is noon.", "Mittag."]
    assert sft.sources[0].trees == 1
    (group,) = rm_mix(german, tmp_path, seed=1, val_fraction=0.0).train
    assert group.tree_id == "t8"
    prompts = prompt_mix(german, tmp_path, seed=1, val_fraction=0.0)
    assert sorted(c[-1].text for c in prompts.train) == ["Danke!", "Danke.", "Thanks!", "Wie spät ist es?"]
    # Open-Assistant's comma-separated form reads the same.
    assert DatasetSpec(path="x", lang="en, de").lang == ["en", "de"]


def test_lang_on_a_plain_prompt_file_is_one_clear_error(tmp_path: Path) -> None:
    plain = tmp_path / "prompts.jsonl"
    plain.write_text('{"prompt": "Hi"}\n')
    with pytest.raises(UserError, match="^prompts: prompts.jsonl: lang filters export trees"):
        prompt_mix([DatasetSpec(path="prompts.jsonl", lang=["en"])], tmp_path, seed=1, val_fraction=0.0)


def test_top_k_keeps_the_best_ranked_replies(trees: dict) -> None:
    # t1 under its prompt: A1 rank 0, A2 rank 1 (then P3 -> A5 rank 0, A6 synthetic), A3 unranked
    # beside siblings, A4 deleted.
    assert texts(sft_conversations(trees["t1"], top_k=1)) == [
        ["How do I boil an egg?", "Put it in boiling water for nine minutes."],
    ]
    # top_k 2 keeps A2 and its subtree; A3 has no rank and siblings, so it stays out (as Open-Assistant).
    assert texts(sft_conversations(trees["t1"], top_k=2)) == [
        ["How do I boil an egg?", "Put it in boiling water for nine minutes."],
        ["How do I boil an egg?", "Boil it.", "Und auf Deutsch, bitte?", "Neun Minuten in kochendes Wasser. Grüße!"],
    ]
    assert sft_conversations(trees["t1"], top_k=100) == sft_conversations(trees["t1"], top_k=2)
    # t8: A2 is rank 1, so top_k 1 leaves only the conversation through A1.
    assert texts(sft_conversations(trees["t8"], top_k=1)) == [["Wie spät ist es?", "It is noon."]]


def test_top_k_keeps_an_unranked_only_reply() -> None:
    from oatui.data.trees import Message, MessageTree

    def message(mid: str, role: str, rank: int | None = None, replies: list | None = None, deleted: bool = False) -> Message:
        return Message(message_id=mid, text=mid, role=role, rank=rank, replies=replies or [], deleted=deleted)

    only = MessageTree("u", "ready_for_export", message("P", "prompter", replies=[message("A", "assistant")]))
    assert texts(sft_conversations(only, top_k=1)) == [["P", "A"]]
    # A sibling counts even when it is deleted (Open-Assistant counts every reply in the export).
    beside_deleted = MessageTree("v", "ready_for_export", message("P", "prompter", replies=[
        message("A", "assistant"), message("B", "assistant", rank=0, deleted=True)]))
    assert sft_conversations(beside_deleted, top_k=1) == []
    assert texts(sft_conversations(beside_deleted)) == [["P", "A"]]


def test_top_k_shapes_rm_contexts_not_replies_and_not_rl_prompts(trees: dict, tmp_path: Path) -> None:
    # t1's groups: {A1, A2} under the prompt; the follow-up under A2 has a group of one usable reply.
    (group,) = rm_groups(trees["t1"], top_k=1)
    assert group.replies == ("Put it in boiling water for nine minutes.", "Boil it.")  # rank 1 stays a reply
    (group,) = rm_groups(trees["t6"], top_k=1)
    assert len(group.replies) == 3
    spec = DatasetSpec(path=str(EDGE), top_k=1)
    def prompts(entry: DatasetSpec) -> list[list[str]]:
        return sorted([turn.text for turn in context] for context in prompt_mix([entry], tmp_path, seed=1, val_fraction=0.0).train)

    assert prompts(spec) == prompts(DatasetSpec(path=str(EDGE)))
    top = sft_mix([spec], tmp_path, seed=1, val_fraction=0.0)
    # t6's rank-0 answer was rejected in review: ranks are taken as exported, so no answer of t6 is
    # in the top 1 (as in Open-Assistant).
    assert sorted(c.turns[-1].text for c in top.train) == ["It is noon.", "Put it in boiling water for nine minutes."]


def test_dataset_entry_keys_are_validated_in_one_line() -> None:
    config = load_stage_config("sft", ["defaults", "tiny"], ["datasets=[{path: sample, top_k: 1, lang: 'en,de'}]"])
    assert (config.datasets[0].top_k, config.datasets[0].lang) == (1, ["en", "de"])
    with pytest.raises(UserError, match=r"^datasets\.0\.top_k: must be at least 1, got 0"):
        load_stage_config("sft", ["defaults", "tiny"], ["datasets=[{path: sample, top_k: 0}]"])
    with pytest.raises(UserError, match=r"^datasets\.0\.lang: must list at least one language"):
        load_stage_config("rm", ["defaults_rm"], ["datasets=[{path: sample, lang: []}]"])
