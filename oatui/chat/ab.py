"""Blind A/B rounds: the gold judge for real data.

One prompt goes to two served models; their answers are shown as A and B in an order drawn at
random for each round, and the person says which is better, or that they tie. Only then is the
order revealed. Each choice is one export tree appended to ``WORKSPACE/data/feedback.trees.jsonl``
(the file rank mode writes, under the same lock):

- the two replies, in the order they were shown (A first), each with the ``model_name`` of the
  model that wrote it: the training run it was exported from when the server knows it, else the
  served model's name;
- a decisive choice ranks the chosen reply 0 and the other 1: one RM group of one pair;
- a tie leaves both replies unranked (``rank: null``). Ties are not pairs: equal ranks would make
  an RM group with no pair in it (a k-wise loss would average over nothing) and a loader that sorts
  replies by rank, as Open-Assistant's does, would read an arbitrary preference into it. So a tie
  adds no RM group; both replies stay usable messages, as in any ranking;
- the tree's ``ab`` object records the round itself: ``{"A": model, "B": model, "choice":
  "A"|"B"|"tie"}``, and ``"runs": {"A": run, "B": run}`` when they are known. Win rates count
  served names, the ones the person picked.

The win rate of each pair of models is derived from those trees (:func:`win_tallies`): the
feedback file is the one record, so the tally survives restarts, is shared by every app and
command on the workspace, and can never disagree with the training data.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oatui.chat.feedback import RankedAnswer, Ranking, answers_model_name, append_tree, ranking_to_tree
from oatui.data.trees import parse_tree

CHOICES = ("A", "B", "tie")
HELP = "a: A is better, b: B is better, t: tie, s: skip"
#: Draws the order of each round. Not seeded: the person must not be able to learn it.
ORDER_RANDOM: random.Random = random.SystemRandom()


def shown_order(first: str, second: str, rng: random.Random | None = None) -> tuple[str, str]:
    """The two model names as (A, B), in an order drawn at random."""
    if first == second:
        raise ValueError(f"A/B needs two different models, got {first!r} twice")
    pair = (first, second)
    return pair if (rng or ORDER_RANDOM).random() < 0.5 else (pair[1], pair[0])


def parse_choice(text: str) -> str | None:
    """``A``, ``B`` or ``tie`` from what the person typed; ``skip`` for a skip; None if unclear."""
    word = text.strip().lower()
    if word in ("a", "1"):
        return "A"
    if word in ("b", "2"):
        return "B"
    if word in ("t", "tie", "=", "0"):
        return "tie"
    if word in ("s", "skip"):
        return "skip"
    return None


@dataclass
class ABRound:
    """One blind comparison: the conversation (ending with the prompter), the models and their
    answers as shown (A, B), and the person's ``choice``."""

    context: Sequence[tuple[str, str]]
    models: tuple[str, str]
    texts: tuple[str, str]
    choice: str
    lang: str = "en"
    system: str | None = None
    #: Who wrote each turn of the context (None for prompter turns or when unknown).
    context_models: Sequence[str | None] | None = None
    #: The training run each model was exported from, when the server knows it (A, B).
    runs: tuple[str | None, str | None] = (None, None)
    created: float = field(default_factory=time.time)

    def validate(self) -> None:
        if self.choice not in CHOICES:
            raise ValueError(f"choice {self.choice!r}: expected one of {', '.join(CHOICES)}")
        if len(self.models) != 2 or len(self.texts) != 2:
            raise ValueError("an A/B round has exactly two answers")
        if self.models[0] == self.models[1]:
            raise ValueError(f"A/B needs two different models, got {self.models[0]!r} twice")

    @property
    def winner(self) -> str | None:
        """The chosen model's name (None for a tie)."""
        return None if self.choice == "tie" else self.models[CHOICES.index(self.choice)]

    @property
    def kept_text(self) -> str:
        """The answer the conversation goes on from: the chosen one, or A's after a tie."""
        return self.texts[1] if self.choice == "B" else self.texts[0]

    @property
    def kept_model(self) -> str:
        return self.models[1] if self.choice == "B" else self.models[0]


def round_tree(ab_round: ABRound) -> dict[str, Any]:
    """The export tree of one round (validated against the export schema)."""
    ab_round.validate()
    ranking = Ranking(context=list(ab_round.context), answers=[RankedAnswer(text) for text in ab_round.texts],
                      model_name=None, lang=ab_round.lang, system=ab_round.system, created=ab_round.created)
    tree = ranking_to_tree(ranking)
    # The context is a chain (each turn has one reply, the next turn); its last turn holds the answers.
    node = tree["prompt"]
    path = [node]
    for _ in range(len(ab_round.context) - 1):
        node = node["replies"][0]
        path.append(node)
    # The run behind a served model when it is known (a re-exported name is another model), else its name.
    named = dict(zip(ab_round.models, ab_round.runs))
    if ab_round.context_models:
        for turn, model in zip(path, ab_round.context_models):
            if turn["role"] == "assistant":
                turn["model_name"] = answers_model_name(model, named.get(model)) if model is not None else None
    replies = path[-1]["replies"]
    for index, reply in enumerate(replies):
        reply["model_name"] = answers_model_name(ab_round.models[index], named.get(ab_round.models[index]))
        if ab_round.choice == "tie":
            reply["rank"] = None
        else:
            reply["rank"] = 0 if CHOICES[index] == ab_round.choice else 1
    tree["ab"] = {"A": ab_round.models[0], "B": ab_round.models[1], "choice": ab_round.choice}
    if any(ab_round.runs):
        tree["ab"]["runs"] = {"A": ab_round.runs[0], "B": ab_round.runs[1]}
    parse_tree(tree)
    return tree


def append_round(feedback_file: Path, ab_round: ABRound) -> dict[str, Any]:
    """Append the round's tree as one line (locked, atomic append); returns the tree."""
    return append_tree(feedback_file, round_tree(ab_round))


# -- win rates -------------------------------------------------------------------------------------


@dataclass
class PairTally:
    """The rounds between two models (named in sorted order)."""

    models: tuple[str, str]
    wins: dict[str, int] = field(default_factory=dict)
    ties: int = 0

    @property
    def rounds(self) -> int:
        return sum(self.wins.values()) + self.ties

    def win_rate(self, model: str) -> float:
        """``model``'s share of the rounds, a tie counting half (0.5 when there are none)."""
        if not self.rounds:
            return 0.5
        return (self.wins.get(model, 0) + 0.5 * self.ties) / self.rounds

    def counts(self) -> str:
        """``policy 7 · policy-sft 3 · 2 ties``."""
        first, second = self.models
        ties = f"{self.ties} tie{'s' if self.ties != 1 else ''}"
        return f"{first} {self.wins.get(first, 0)} · {second} {self.wins.get(second, 0)} · {ties}"

    def headline(self) -> str:
        """``policy wins 67% of 12``: the model ahead (the first by name when even) and its rate."""
        first, second = self.models
        leader = first if self.win_rate(first) >= self.win_rate(second) else second
        return f"{leader} wins {self.win_rate(leader):.0%} of {self.rounds}"

    def describe(self) -> str:
        """One line: ``policy 7 · policy-sft 3 · 2 ties: policy wins 67% of 12 (a tie counts half)``."""
        return f"{self.counts()}: {self.headline()} (a tie counts half)"

    def to_dict(self) -> dict[str, Any]:
        return {"models": list(self.models), "wins": {m: self.wins.get(m, 0) for m in self.models},
                "ties": self.ties, "rounds": self.rounds,
                "win_rate": {m: round(self.win_rate(m), 4) for m in self.models}}


def pair_key(first: str, second: str) -> tuple[str, str]:
    return (first, second) if first <= second else (second, first)


def _rounds_of(lines: Iterable[bytes]) -> Iterable[dict[str, Any]]:
    """The ``ab`` records of the A/B trees among export lines (other lines, torn ones included, skipped)."""
    for line in lines:
        if b'"ab":' not in line:  # cheap: most lines are other trees
            continue
        try:
            tree = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        record = tree.get("ab") if isinstance(tree, dict) else None
        if (isinstance(record, dict) and isinstance(record.get("A"), str) and isinstance(record.get("B"), str)
                and record["A"] != record["B"] and record.get("choice") in CHOICES):
            yield record


def win_tallies(feedback_file: Path) -> dict[tuple[str, str], PairTally]:
    """Every pair's tally from the A/B trees of the feedback file (none yet: an empty dict)."""
    tallies: dict[tuple[str, str], PairTally] = {}
    try:
        handle = open(feedback_file, "rb")
    except FileNotFoundError:
        return tallies
    with handle:
        for record in _rounds_of(handle):
            key = pair_key(record["A"], record["B"])
            tally = tallies.setdefault(key, PairTally(key))
            if record["choice"] == "tie":
                tally.ties += 1
            else:
                winner = record[record["choice"]]
                tally.wins[winner] = tally.wins.get(winner, 0) + 1
    return tallies


def pair_tally(feedback_file: Path, first: str, second: str) -> PairTally:
    key = pair_key(first, second)
    return win_tallies(feedback_file).get(key) or PairTally(key)
