"""Rankings written back as export trees: the schema, the rules, locked appends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from oatui.chat.feedback import RankedAnswer, Ranking, append_ranking, ranking_to_tree
from oatui.data.rules import compute_stats, rm_groups, sft_conversations
from oatui.data.trees import load_trees, parse_tree


def test_a_ranking_of_three_is_one_group_of_three_pairs(tmp_path: Path) -> None:
    target = tmp_path / "data" / "feedback.trees.jsonl"
    ranking = Ranking(
        context=[("prompter", "How do I get started with baking bread?")],
        answers=[RankedAnswer("Sure, happy to help! Start small."), RankedAnswer("Whatever."), RankedAnswer("Ugh, fine. For chess")],
        model_name="policy",
        lang="en",
    )
    tree = append_ranking(target, ranking)
    (line,) = target.read_text().splitlines()
    assert json.loads(line) == tree
    parsed = parse_tree(json.loads(line))
    assert parsed.tree_state == "ready_for_export" and parsed.origin == "oatui"
    assert [reply.rank for reply in parsed.prompt.replies] == [0, 1, 2]
    assert all(reply.model_name == "policy" and reply.review_result is True and reply.synthetic is False
               for reply in parsed.prompt.replies)
    stats = compute_stats(load_trees(target)).to_dict()
    assert (stats["trees"], stats["rm_groups"], stats["rm_pairs"], stats["sft_conversations"]) == (1, 1, 3, 3)
    assert stats["languages"] == {"en": 4}


def test_an_edit_becomes_the_best_demonstration_and_a_rejection_is_dropped() -> None:
    ranking = Ranking(
        context=[("prompter", "Hi"), ("assistant", "Hello!"), ("prompter", "Tips for chess?")],
        answers=[
            RankedAnswer("Of course! Learn the openings slowly. Have fun.", edited_from="Learn the openings"),
            RankedAnswer("Whatever."),
            RankedAnswer("spam spam", rejected=True),
        ],
    )
    tree = parse_tree(ranking_to_tree(ranking))
    (group,) = rm_groups(tree)
    assert group.replies == ("Of course! Learn the openings slowly. Have fun.", "Learn the openings", "Whatever.")
    assert [t.text for t in group.context] == ["Hi", "Hello!", "Tips for chess?"]
    demonstrations = [c.turns[-1].text for c in sft_conversations(tree)]
    assert "Of course! Learn the openings slowly. Have fun." in demonstrations and "spam spam" not in demonstrations


@pytest.mark.parametrize("answers", [[RankedAnswer("only one")], [RankedAnswer("a", rejected=True), RankedAnswer("b", rejected=True)]])
def test_rankings_that_teach_nothing_are_refused(answers: list[RankedAnswer]) -> None:
    with pytest.raises(ValueError):
        ranking_to_tree(Ranking(context=[("prompter", "Q")], answers=answers))


def test_two_writers_append_whole_trees(tmp_path: Path) -> None:
    target = tmp_path / "feedback.trees.jsonl"
    script = (
        "import sys\n"
        "from oatui.chat.feedback import RankedAnswer, Ranking, append_ranking\n"
        "for i in range(150):\n"
        "    append_ranking(__import__('pathlib').Path(sys.argv[1]), Ranking(context=[('prompter', sys.argv[2] + str(i))],\n"
        "        answers=[RankedAnswer('good ' * (i % 40)), RankedAnswer('bad')]))\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, str(target), name]) for name in ("a", "b")]
    assert all(w.wait(timeout=120) == 0 for w in writers)
    trees = load_trees(target)
    assert len(trees) == 300
    for name in "ab":
        assert [t.prompt.text for t in trees if t.prompt.text.startswith(name)] == [f"{name}{i}" for i in range(150)]
