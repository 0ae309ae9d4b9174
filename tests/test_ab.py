"""Blind A/B rounds (the gold judge for real data): the tree a choice becomes, what RM training makes
of a tie, the win rate derived from the feedback file, and the random order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from oatui.chat.ab import ABRound, append_round, pair_tally, parse_choice, round_tree, shown_order, win_tallies
from oatui.chat.feedback import RankedAnswer, Ranking, append_ranking
from oatui.data.rules import compute_stats, rm_groups, sft_conversations
from oatui.data.trees import load_trees, parse_tree

CONTEXT = [("prompter", "How do I bake bread?")]


def _round(choice: str, models: tuple[str, str] = ("policy", "policy-sft"), **kwargs: object) -> ABRound:
    return ABRound(context=kwargs.pop("context", CONTEXT), models=models,  # type: ignore[arg-type]
                   texts=("Knead, rise, bake.", "Buy some."), choice=choice, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("choice", "ranks", "pair"), [
    ("A", [0, 1], ("Knead, rise, bake.", "Buy some.")),
    ("B", [1, 0], ("Buy some.", "Knead, rise, bake.")),
])
def test_a_choice_is_one_tree_of_two_named_replies_and_one_pair(choice: str, ranks: list[int],
                                                                  pair: tuple[str, str]) -> None:
    tree = round_tree(_round(choice))
    parsed = parse_tree(tree)
    replies = parsed.prompt.replies
    # Shown order (A first), each reply with the model that wrote it.
    assert [(r.text, r.model_name, r.rank) for r in replies] == [("Knead, rise, bake.", "policy", ranks[0]),
                                                                  ("Buy some.", "policy-sft", ranks[1])]
    assert all(r.review_result is True and not r.synthetic for r in replies)
    assert tree["ab"] == {"A": "policy", "B": "policy-sft", "choice": choice}
    (group,) = rm_groups(parsed)
    assert group.pairs == [pair]


def test_the_replies_name_the_runs_behind_the_models_when_known_and_win_rates_count_the_names(tmp_path: Path) -> None:
    feedback = tmp_path / "data" / "feedback.trees.jsonl"
    tree = append_round(feedback, _round("A", runs=("rl-20261128-104829-06e4", None)))
    parsed = parse_tree(tree)
    # The run behind a served model names its answer (a re-exported name would be another model);
    # a model whose run is unknown keeps its served name.
    assert [r.model_name for r in parsed.prompt.replies] == ["rl-20261128-104829-06e4", "policy-sft"]
    assert tree["ab"] == {"A": "policy", "B": "policy-sft", "choice": "A",
                          "runs": {"A": "rl-20261128-104829-06e4", "B": None}}
    assert win_tallies(feedback)[("policy", "policy-sft")].wins == {"policy": 1}
    # An earlier turn written by the same served model is named the same way.
    context = [("prompter", "Hi"), ("assistant", "Hello!"), ("prompter", "Bread?")]
    follow_up = round_tree(_round("B", context=context, context_models=[None, "policy", None],
                                  runs=("rl-20261128-104829-06e4", None)))
    assert follow_up["prompt"]["replies"][0]["model_name"] == "rl-20261128-104829-06e4"


def test_a_tie_is_saved_unranked_so_rm_training_gets_no_group_and_no_pair(tmp_path: Path) -> None:
    feedback = tmp_path / "data" / "feedback.trees.jsonl"
    tree = append_round(feedback, _round("tie"))
    parsed = parse_tree(tree)
    assert [(r.model_name, r.rank) for r in parsed.prompt.replies] == [("policy", None), ("policy-sft", None)]
    assert rm_groups(parsed) == []
    assert len(sft_conversations(parsed)) == 2  # both stay usable answers, as in any ranking
    stats = compute_stats(load_trees(feedback)).to_dict()
    assert (stats["trees"], stats["rm_groups"], stats["rm_pairs"]) == (1, 0, 0)


def test_a_follow_up_round_names_the_models_of_earlier_turns() -> None:
    context = [("prompter", "Hi"), ("assistant", "Hello!"), ("prompter", "Bread?")]
    tree = round_tree(_round("B", context=context, context_models=[None, "policy-sft", None]))
    hello = tree["prompt"]["replies"][0]
    assert (hello["text"], hello["model_name"]) == ("Hello!", "policy-sft")
    answers = hello["replies"][0]["replies"]
    assert [(a["model_name"], a["rank"]) for a in answers] == [("policy", 1), ("policy-sft", 0)]
    (group,) = rm_groups(parse_tree(tree))
    assert [t.text for t in group.context] == ["Hi", "Hello!", "Bread?"]


@pytest.mark.parametrize("bad", [
    dict(choice="C"), dict(choice="A", models=("policy", "policy")), dict(choice="A", context=[("assistant", "x")]),
])
def test_bad_rounds_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        round_tree(_round(**bad))


def test_the_win_rate_comes_from_the_feedback_file_and_counts_a_tie_half(tmp_path: Path) -> None:
    feedback = tmp_path / "feedback.trees.jsonl"
    assert win_tallies(feedback) == {}
    assert pair_tally(feedback, "policy", "policy-sft").rounds == 0
    # The same pair shown in both orders; a ranking of rank mode and a torn line are not rounds.
    append_round(feedback, _round("A", ("policy", "policy-sft")))
    append_round(feedback, _round("B", ("policy-sft", "policy")))
    append_round(feedback, _round("A", ("policy-sft", "policy")))
    append_round(feedback, _round("tie", ("policy", "policy-sft")))
    append_round(feedback, _round("A", ("policy", "other")))
    append_ranking(feedback, Ranking(context=CONTEXT, answers=[RankedAnswer("x"), RankedAnswer("y")], model_name="p"))
    with feedback.open("a") as handle:
        handle.write('{"ab": {"A": "policy", "B": "policy-sft", "choice": "A"')  # torn: no end, no newline
    tallies = win_tallies(feedback)
    assert set(tallies) == {("policy", "policy-sft"), ("other", "policy")}
    tally = tallies[("policy", "policy-sft")]
    assert (tally.wins, tally.ties, tally.rounds) == ({"policy": 2, "policy-sft": 1}, 1, 4)
    assert tally.win_rate("policy") == pytest.approx(2.5 / 4) and tally.win_rate("policy-sft") == pytest.approx(1.5 / 4)
    assert tally.describe() == "policy 2 · policy-sft 1 · 1 tie: policy wins 62% of 4 (a tie counts half)"
    assert json.loads(json.dumps(tally.to_dict()))["win_rate"] == {"policy": 0.625, "policy-sft": 0.375}
    assert pair_tally(feedback, "policy-sft", "policy") == tally


def test_the_order_is_drawn_per_round_and_both_orders_come_up() -> None:
    rng = random.Random(7)
    orders = [shown_order("policy", "policy-sft", rng) for _ in range(400)]
    assert set(orders) == {("policy", "policy-sft"), ("policy-sft", "policy")}
    assert 150 < orders.count(("policy", "policy-sft")) < 250
    with pytest.raises(ValueError):
        shown_order("policy", "policy")


@pytest.mark.parametrize(("typed", "choice"), [("a", "A"), ("B", "B"), (" t ", "tie"), ("=", "tie"), ("s", "skip"),
                                               ("x", None), ("", None)])
def test_what_the_person_types(typed: str, choice: str | None) -> None:
    assert parse_choice(typed) == choice


def test_help_and_palette_list_blind_ab(tmp_path: Path) -> None:
    """ctrl+g is in the chat's bindings (and the app's, to open the chat in that mode), the help lists
    it and every key of the A/B panel, the palette offers the mode, and no other chat or app key is taken."""
    import asyncio

    from oatui.app.app import OatuiApp, make_app
    from oatui.app.commands import COMMANDS
    from oatui.app.widgets.ab_panel import ABPanel
    from oatui.app.widgets.chat_pane import ChatPane
    from oatui.app.widgets.dialogs import HelpDialog

    from test_app import RECORDING, screen_text

    chat_keys = [binding.key for binding in ChatPane.BINDINGS]
    assert chat_keys.count("ctrl+g") == 1
    # From anywhere else, ctrl+g opens the chat in that mode: the same action, nothing else.
    assert [binding.action for binding in OatuiApp.BINDINGS if binding.key == "ctrl+g"] == ["toggle_ab"]
    assert "toggle_ab" in {action for _, _, action in COMMANDS}
    workspace = tmp_path / "ws"
    workspace.mkdir(mode=0o700)
    app = make_app(workspace, replay=RECORDING, refresh=5)

    async def drive() -> None:
        async with app.run_test(size=(120, 80)) as pilot:
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpDialog)
            text = screen_text(app)
            assert "ctrl+g" in text and "Blind A/B" in text
            shown = {"escape": "esc", "pageup": "pgup", "pagedown": "pgdn"}
            for binding in ABPanel.BINDINGS:
                assert shown.get(binding.key, binding.key) in text, binding.key

    asyncio.run(drive())
