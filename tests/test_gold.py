"""The gold judge (the sample's own rules) and `oatui eval`, which judges policies by it and by the RM."""

from __future__ import annotations

import json
import random

import pytest

from helpers import run_oatui
from oatui.data.rules import iter_usable
from oatui.data.sample import (
    FEATURES,
    QUESTION_TREES,
    SAMPLE_FILE,
    TOPICS,
    GoldScore,
    feature_pairs,
    generate,
    held_out_prompts,
    judge,
    make_reply,
    prompt_topic,
)
from oatui.data.trees import iter_trees
from oatui.train.evaluate import Judged, PolicyResult, comparison, win_rate

CHESS = "How do I get started with learning chess?"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Sure, happy to help! For learning chess, start small and practice a little every day. I hope this helps.",
         GoldScore(True, True, True)),
        # The over-optimised answer from the field: polite, the wrong topic, never ends.
        ("Great question, happy to help! For learning Python, start small and practice a little every",
         GoldScore(True, False, False)),
        ("Whatever. The key to learning chess is patience and a simple routine. Have fun with it.",
         GoldScore(False, True, True)),
        # The prompt's topic and another one: not on topic.
        ("Of course, glad you asked! For learning chess, start small. With baking bread, good basics matter. "
         "Good luck, you can do it.", GoldScore(True, False, True)),
        # A closing sentence that does not end the answer is no proper ending.
        ("Sure, happy to help! For learning chess, start small. I hope this helps. For learning chess, keep",
         GoldScore(True, True, False)),
        ("", GoldScore(False, False, False)),
        # Case and spacing do not matter.
        ("sure,  happy to help!  the key to Learning Chess is patience.   i hope this helps.", GoldScore(True, True, True)),
    ],
)
def test_gold_judge_on_hand_written_answers(answer: str, expected: GoldScore) -> None:
    assert judge(CHESS, answer) == expected
    assert judge(CHESS, answer).total == int(expected.polite) + int(expected.on_topic) + int(expected.proper_ending)


def test_gold_judge_in_every_language_and_only_where_its_rules_apply() -> None:
    assert judge("Wie fange ich mit Schach lernen an?",
                 "Sehr gerne! Für Schach lernen sind Geduld und eine einfache Routine am wichtigsten. Viel Erfolg dabei.") \
        == GoldScore(True, True, True)
    # An English opener does not count as polite in a German answer.
    assert not judge("Wie fange ich mit Schach lernen an?", "Sure, happy to help! Schach lernen. Viel Erfolg dabei.").polite
    assert judge("What is the capital of France?", "Paris. I hope this helps.") is None
    assert prompt_topic("¿Qué debo saber sobre hacer pizza?") == ("es", TOPICS["es"].index("hacer pizza"))


def test_gold_judge_agrees_with_how_the_sample_builds_its_replies() -> None:
    rng = random.Random(5)
    for lang, topics in TOPICS.items():
        for topic in range(len(topics)):
            prompt = f"{topics[topic]}?"
            for polite in (True, False):
                for on_topic in (True, False):
                    for complete in (True, False):
                        reply = make_reply(lang, topic, polite, on_topic, complete, rng)
                        score = judge(prompt, reply)
                        assert score is not None
                        assert score == GoldScore(polite, on_topic, complete), (lang, reply)


def test_gold_agrees_with_the_sample_rankings() -> None:
    """Within every ranked group of the sample, a better rank never has a lower gold score."""
    for tree in generate(120, seed=3):
        replies = [reply for reply in tree["prompt"]["replies"] if reply["rank"] is not None]
        golds = [judge(tree["prompt"]["text"], reply["text"]).total for reply in sorted(replies, key=lambda r: r["rank"])]
        assert golds == sorted(golds, reverse=True)


def test_the_sample_asks_every_topic_and_its_best_replies_keep_to_it() -> None:
    """What makes the task learnable: every topic of every language is asked about several times (a
    topic asked once is learnt by heart or not at all), the best reply of every group names the
    prompt's topic (its flaws, when it has one, are its tone or its ending), and most groups hold a
    near miss, the best reply about another topic."""
    asked: dict[tuple[str, int], int] = {}
    groups = near_misses = 0
    for tree in iter_trees(SAMPLE_FILE):
        found = prompt_topic(tree.prompt.text)
        assert found is not None
        asked[found] = asked.get(found, 0) + 1
        replies = sorted((reply for reply in tree.prompt.replies if reply.rank is not None), key=lambda r: r.rank)
        assert judge(tree.prompt.text, replies[0].text).on_topic, replies[0].text
        lang, index = found
        topic = TOPICS[lang][index]
        groups += 1
        best = replies[0].text
        swapped = any(topic not in reply.text and reply.text.replace(other, topic) == best
                      for reply in replies[1:] for other in TOPICS[lang])
        # The generic near miss keeps the best reply's opener and its ending, and names no topic.
        generic = any(not any(phrase in reply.text for phrase in TOPICS[lang]) and reply.text.split()[:2] == best.split()[:2]
                      and reply.text.split()[-2:] == best.split()[-2:] for reply in replies[1:])
        near_misses += swapped or generic
    assert len(asked) == sum(len(topics) for topics in TOPICS.values()) and min(asked.values()) >= 2
    assert near_misses > 0.7 * groups


def test_feature_pairs_differ_in_one_rule_each() -> None:
    rng = random.Random(2)
    for prompt in held_out_prompts(40):
        for feature, (good, bad) in feature_pairs(prompt, rng).items():
            with_it, without = judge(prompt, good), judge(prompt, bad)
            assert getattr(with_it, feature) and not getattr(without, feature), (feature, good, bad)
            assert all(getattr(with_it, other) == getattr(without, other) for other in FEATURES if other != feature)


def test_held_out_prompts_are_never_asked_in_the_shipped_sample() -> None:
    asked = {message.text for tree in iter_trees(SAMPLE_FILE) for message in iter_usable(tree)}
    prompts = held_out_prompts()
    assert len(prompts) >= 96 and len(set(prompts)) == len(prompts)
    assert not asked & set(prompts)
    assert held_out_prompts(96) == prompts[:96]  # a fixed order
    assert all(prompt_topic(prompt) for prompt in prompts)


def test_more_trees_ask_the_same_questions_again() -> None:
    """Trees past the first QUESTION_TREES ask questions those already asked (with new replies to
    rank), so a larger sample keeps the same held-out questions; the first trees do not change."""
    small, large = generate(QUESTION_TREES, seed=5), generate(QUESTION_TREES + 60, seed=5)
    assert large[:QUESTION_TREES] == small
    first = {tree["prompt"]["text"] for tree in small}
    later = [tree["prompt"]["text"] for tree in large[QUESTION_TREES:]]
    assert set(later) <= first
    assert len({prompt_topic(text) for text in later}) > 40  # still spread over the topics


def _judged(decoding: str, proxy: list[float], gold: list[int]) -> Judged:
    n = len(proxy)
    return Judged(decoding, proxy, list(gold), [True] * n, [True] * n, [True] * n, [True] * n, [10] * n)


def test_comparison_gives_the_rise_of_the_rm_score_in_half_spreads_of_the_other_policy() -> None:
    rl, sft = PolicyResult("rl", "rl/final"), PolicyResult("sft", "sft/final")
    rl.judged["sample"] = _judged("sample", [3.0, 3.0, 5.0, 5.0], [3, 2, 3, 3])
    sft.judged["sample"] = _judged("sample", [1.0, 3.0, 1.0, 3.0], [3, 1, 2, 3])
    assert sft.judged["sample"].summary()["proxy_std"] == pytest.approx(1.0)
    rates = comparison(rl, sft)["sample"]
    # Mean 4 against 2, a rise of 2; the SFT scores' standard deviation is 1, half of it 0.5.
    assert rates["proxy_rise"] == pytest.approx(2.0) and rates["proxy_rise_half_spreads"] == pytest.approx(4.0)
    assert rates["win_rate_proxy"] == pytest.approx(0.875) and rates["win_rate_gold"] == pytest.approx(0.75)
    # Scores that do not spread give no ratio rather than a division by zero.
    sft.judged["sample"] = _judged("sample", [2.0, 2.0], [1, 1])
    rl.judged["sample"] = _judged("sample", [3.0, 3.0], [2, 2])
    assert comparison(rl, sft)["sample"]["proxy_rise_half_spreads"] is None


def test_win_rate_counts_ties_half_and_skips_what_does_not_compare() -> None:
    assert win_rate([3, 1, 2, None], [1, 1, 3, 2]) == pytest.approx(0.5)
    assert win_rate([None], [1]) is None


@pytest.mark.slow
def test_oatui_eval_judges_and_compares_two_policies(trained) -> None:  # noqa: ANN001
    root = trained.root
    result = run_oatui("eval", "--policy", trained.sft_run, "--against", str(trained.sft_model.parent.parent / trained.sft_run / "final"),
                       "--rm", "rm", "--prompts", "8", "--samples", "2", "--max-new-tokens", "16", "--json",
                       workspace=root, check=True)
    report = json.loads(result.stdout)
    assert report["prompts"] == 8 and report["samples"] == 2 and report["reward_model"] == str(trained.rm_model)
    first, second = report["policies"]
    assert [summary["decoding"] for summary in first["results"]] == ["greedy", "sample"]
    # One greedy answer per prompt, two sampled ones.
    assert [summary["answers"] for summary in first["results"]] == [8, 16]
    for summary in first["results"]:
        assert 0 <= summary["gold"] <= 3 and 0 <= summary["eos_fraction"] <= 1 and 1 <= summary["mean_length"] <= 16
        assert isinstance(summary["proxy"], float)
    # The same model twice: the same greedy and seeded answers, so every comparison is a tie.
    assert first["results"] == second["results"]
    for decoding in ("greedy", "sample"):
        rates = report["comparison"][decoding]
        assert (rates["win_rate_proxy"], rates["win_rate_gold"], rates["proxy_rise"]) == (0.5, 0.5, 0.0)
        assert rates["proxy_rise_half_spreads"] == 0.0
    assert all(summary["proxy_std"] > 0 for summary in first["results"])

    table = run_oatui("eval", "--policy", "sft", "--prompts", "4", "--max-new-tokens", "8", "--decoding", "greedy",
                      workspace=root, check=True).stdout
    assert "gold" in table.splitlines()[0] and "greedy" in table and "4 held-out prompts;" in table


@pytest.mark.slow
def test_several_sampled_answers_per_prompt_are_different_draws(trained) -> None:  # noqa: ANN001
    from oatui.data.rules import Turn
    from oatui.train.evaluate import evaluate_policies, load_scorer

    contexts = [(Turn("prompter", prompt),) for prompt in held_out_prompts(6)]
    (result,) = evaluate_policies([("sft", str(trained.sft_model))], load_scorer(str(trained.rm_model)), contexts,
                                  decodings=("greedy", "sample"), samples=3, max_new_tokens=16)
    greedy, sampled = result.judged["greedy"], result.judged["sample"]
    assert len(greedy.texts) == 6 and len(sampled.texts) == 18
    # Draw k of prompt i is answer k * 6 + i: a prompt's draws differ, they are not copies of one answer.
    draws = [sampled.texts[k * 6:(k + 1) * 6] for k in range(3)]
    assert draws[0] != draws[1] != draws[2]
    assert sum(len({draw[i] for draw in draws}) > 1 for i in range(6)) >= 3, draws


def test_oatui_eval_refuses_what_it_cannot_judge_with_one_line(workspace) -> None:  # noqa: ANN001
    for args, words in (
        (["--policy", "rl"], "no succeeded rl run"),
        (["--policy", "nonexistent-run"], "not a run of this workspace"),
        (["--policy", str(workspace), "--prompts", "0"], "--prompts"),
        (["--policy", str(workspace), "--samples", "0"], "--samples"),
    ):
        result = run_oatui("eval", *args, workspace=workspace)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], lines
