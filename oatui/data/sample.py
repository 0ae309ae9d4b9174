"""A deterministic sample export: several hundred message trees in four languages.

The replies carry a signal a tiny model can learn. Every reply is built from three features:
- it opens politely (or brushes the user off),
- it stays on the topic of the prompt (or talks about another topic),
- it ends properly with a closing sentence (or is cut off mid-sentence).
Replies with more of these features are ranked better (rank 0 is best), so a reward model can
learn the ranking and a policy can learn to earn a higher reward.

Run ``python -m oatui.data.sample --out FILE`` to write it; the shipped copy at
``oatui/data/sample/oasst_sample.trees.jsonl.gz`` is exactly what the defaults produce.

The same three rules make the gold judge (:func:`judge`): an answer earns a point for each feature
it has, 0 to 3. The reward model only ever sees rankings; the gold judge is never a training
signal, so it can tell a policy that got better from one that learnt to please the reward model.
:func:`held_out_prompts` are questions in the sample's style that the shipped export never asks.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oatui.data.trees import iter_trees

SAMPLE_FILE = Path(__file__).parent / "sample" / "oasst_sample.trees.jsonl.gz"
DEFAULT_TREES = 800
DEFAULT_SEED = 20231
#: The first this many trees choose which questions the sample asks; later trees ask those questions
#: again, with new replies to rank. So the questions no tree asks (:func:`held_out_prompts`) stay
#: unseen however many trees there are, and a reward model gets more comparisons to learn from.
QUESTION_TREES = 400

# Topic nouns per language: the same index is the same topic.
TOPICS: dict[str, list[str]] = {
    "en": [
        "baking bread", "learning guitar", "running a marathon", "growing tomatoes", "saving money",
        "writing a resume", "learning Python", "brewing coffee", "training a puppy", "painting with watercolors",
        "planning a trip", "sleeping better", "speaking in public", "fixing a bike", "learning chess",
        "making pizza", "reading more books", "starting a podcast", "keeping houseplants", "learning to swim",
        "taking photos", "meditating daily", "cooking rice", "studying for exams",
    ],
    "de": [
        "Brot backen", "Gitarre lernen", "einen Marathon laufen", "Tomaten anbauen", "Geld sparen",
        "einen Lebenslauf schreiben", "Python lernen", "Kaffee kochen", "einen Welpen erziehen", "Aquarellmalerei",
        "eine Reise planen", "besser schlafen", "frei sprechen", "ein Fahrrad reparieren", "Schach lernen",
        "Pizza backen", "mehr Bücher lesen", "einen Podcast starten", "Zimmerpflanzen pflegen", "schwimmen lernen",
        "Fotos machen", "täglich meditieren", "Reis kochen", "für Prüfungen lernen",
    ],
    "es": [
        "hornear pan", "aprender guitarra", "correr un maratón", "cultivar tomates", "ahorrar dinero",
        "escribir un currículum", "aprender Python", "preparar café", "entrenar a un cachorro", "pintar con acuarela",
        "planear un viaje", "dormir mejor", "hablar en público", "arreglar una bicicleta", "aprender ajedrez",
        "hacer pizza", "leer más libros", "empezar un pódcast", "cuidar plantas", "aprender a nadar",
        "tomar fotos", "meditar a diario", "cocinar arroz", "estudiar para exámenes",
    ],
    "fr": [
        "faire du pain", "apprendre la guitare", "courir un marathon", "cultiver des tomates", "économiser de l'argent",
        "écrire un CV", "apprendre Python", "préparer du café", "dresser un chiot", "peindre à l'aquarelle",
        "organiser un voyage", "mieux dormir", "parler en public", "réparer un vélo", "apprendre les échecs",
        "faire une pizza", "lire plus de livres", "lancer un podcast", "entretenir des plantes", "apprendre à nager",
        "prendre des photos", "méditer chaque jour", "cuire du riz", "réviser pour les examens",
    ],
}

PROMPTS = {
    "en": [
        "How do I get started with {t}?", "Can you give me some tips for {t}?",
        "What should I know about {t}?", "I want to try {t}. Where do I begin?",
        "Any advice on {t} for a beginner?",
    ],
    "de": [
        "Wie fange ich mit {t} an?", "Hast du Tipps zum Thema {t}?",
        "Was sollte ich über {t} wissen?", "Ich möchte {t} ausprobieren. Wo fange ich an?",
    ],
    "es": [
        "¿Cómo empiezo a {t}?", "¿Me das consejos para {t}?",
        "¿Qué debo saber sobre {t}?", "Quiero {t}. ¿Por dónde empiezo?",
    ],
    "fr": [
        "Comment commencer à {t} ?", "Tu as des conseils pour {t} ?",
        "Que faut-il savoir pour {t} ?", "Je veux {t}. Par où commencer ?",
    ],
}

FOLLOW_UPS = {
    "en": ["Thanks! Can you tell me more about {t}?", "What is the most common mistake with {t}?"],
    "de": ["Danke! Kannst du mehr über {t} sagen?", "Was ist der häufigste Fehler beim Thema {t}?"],
    "es": ["¡Gracias! ¿Puedes contarme más sobre {t}?", "¿Cuál es el error más común al {t}?"],
    "fr": ["Merci ! Tu peux m'en dire plus pour {t} ?", "Quelle est l'erreur la plus courante pour {t} ?"],
}

POLITE = {
    "en": ["Sure, happy to help!", "Of course, glad you asked!", "Great question, happy to help!"],
    "de": ["Gerne helfe ich dir!", "Natürlich, gute Frage!", "Sehr gerne!"],
    "es": ["¡Claro, con mucho gusto!", "¡Por supuesto, buena pregunta!", "¡Con gusto te ayudo!"],
    "fr": ["Bien sûr, avec plaisir !", "Volontiers, bonne question !", "Avec plaisir !"],
}

RUDE = {
    "en": ["Ugh, fine.", "Whatever.", "Not this again."],
    "de": ["Na gut, wenn es sein muss.", "Meinetwegen.", "Schon wieder das."],
    "es": ["Bueno, si insistes.", "Como quieras.", "Otra vez esto."],
    "fr": ["Bon, si tu insistes.", "Comme tu veux.", "Encore ça."],
}

BODY = {
    "en": [
        "For {t}, start small and practice a little every day.",
        "The key to {t} is patience and a simple routine.",
        "Many people enjoy {t} more once they set a clear goal.",
        "With {t}, good basics matter more than fancy equipment.",
        "Keep notes on your progress with {t} so you can see what works.",
    ],
    "de": [
        "Beim Thema {t} hilft es, klein anzufangen und jeden Tag etwas zu üben.",
        "Für {t} sind Geduld und eine einfache Routine am wichtigsten.",
        "Mit einem klaren Ziel macht {t} gleich mehr Freude.",
        "Bei {t} zählen gute Grundlagen mehr als teure Ausrüstung.",
    ],
    "es": [
        "Para {t}, empieza poco a poco y practica un poco cada día.",
        "La clave para {t} es la paciencia y una rutina sencilla.",
        "Con una meta clara, {t} resulta mucho más fácil.",
        "Para {t}, las bases importan más que el equipo caro.",
    ],
    "fr": [
        "Pour {t}, commence doucement et pratique un peu chaque jour.",
        "La clé pour {t}, c'est la patience et une routine simple.",
        "Avec un objectif clair, {t} devient plus agréable.",
        "Pour {t}, les bases comptent plus que le matériel cher.",
    ],
}

# Sentences that could follow any question: a reply made of one answers none in particular.
GENERIC = {
    "en": ["Start small and practice a little every day.", "Patience and a simple routine are the key.",
           "Good basics matter more than fancy equipment."],
    "de": ["Fang klein an und übe jeden Tag ein bisschen.", "Geduld und eine einfache Routine sind am wichtigsten.",
           "Gute Grundlagen zählen mehr als teure Ausrüstung."],
    "es": ["Empieza poco a poco y practica un poco cada día.", "La paciencia y una rutina sencilla son la clave.",
           "Las bases importan más que el equipo caro."],
    "fr": ["Commence doucement et pratique un peu chaque jour.", "La patience et une routine simple, c'est la clé.",
           "Les bases comptent plus que le matériel cher."],
}

CLOSING = {
    "en": ["I hope this helps.", "Good luck, you can do it.", "Have fun with it."],
    "de": ["Ich hoffe, das hilft dir.", "Viel Erfolg dabei.", "Viel Spaß dabei."],
    "es": ["Espero que te ayude.", "Mucha suerte.", "Que lo disfrutes."],
    "fr": ["J'espère que cela t'aide.", "Bonne chance.", "Amuse-toi bien."],
}

LANG_WEIGHTS = {"en": 0.4, "de": 0.2, "es": 0.2, "fr": 0.2}


#: How often a reply that misses the prompt's topic names no topic at all (a generic answer) instead
#: of another one, and how often a group of three holds the generic near miss rather than the other.
GENERIC_MISS = 0.35


@dataclass(frozen=True)
class _Parts:
    """What a reply is made of, so that a near miss can be the same reply about something else."""

    opener: str
    template: str
    subject: str | None
    """The topic the body is about; None for a generic body (``template`` is then the whole sentence)."""
    closing: str
    cut: float | None
    """Where an incomplete reply stops, as a share of the words it may keep; None when complete."""

    def about(self, subject: str | None, template: str) -> "_Parts":
        return _Parts(self.opener, template, subject, self.closing, self.cut)

    def render(self) -> str:
        sentence = self.template if self.subject is None else self.template.format(t=self.subject)
        if self.cut is None:
            return f"{self.opener} {sentence} {self.closing}"
        words = sentence.split()
        # Through the topic, then some but never all of the rest of the sentence.
        head = 0 if self.subject is None else len(self.template.split("{t}")[0].split() + self.subject.split())
        head = min(head, len(words) - 2)
        keep = head + 1 + int(self.cut * (len(words) - head - 1))
        return " ".join(self.opener.split() + words[:keep])


def _other_subject(lang: str, topic: int, template: str, rng: random.Random) -> tuple[str | None, str]:
    """(subject, template) of a body that misses ``topic``: the same sentence about another topic, or a
    generic sentence about none."""
    if rng.random() < GENERIC_MISS:
        return None, rng.choice(GENERIC[lang])
    topics = TOPICS[lang]
    return topics[(topic + rng.randrange(1, len(topics))) % len(topics)], template


def _parts(lang: str, topic: int, polite: bool, on_topic: bool, complete: bool, rng: random.Random) -> _Parts:
    template = rng.choice(BODY[lang])
    subject, template = (TOPICS[lang][topic], template) if on_topic else _other_subject(lang, topic, template, rng)
    opener = rng.choice(POLITE[lang] if polite else RUDE[lang])
    return _Parts(opener, template, subject, rng.choice(CLOSING[lang]), None if complete else rng.random())


def make_reply(
    lang: str, topic: int, polite: bool, on_topic: bool, complete: bool, rng: random.Random
) -> str:
    """A polite or rude opener, one sentence (about the topic, another one or none), and a closing
    sentence; an incomplete reply is cut off mid-sentence, after the topic, as a writer who stopped
    or hit a limit leaves it."""
    return _parts(lang, topic, polite, on_topic, complete, rng).render()


Features = tuple[bool, bool, bool]
"""(polite, on_topic, complete)."""

# Quality levels of a reply, best first: ordered by how many features it has, and among replies with
# as many, the one that keeps to the prompt's topic first (an answer to another question helps least).
_LEVELS: list[list[Features]] = [
    [(True, True, True)],
    [(False, True, True), (True, True, False)],
    [(True, False, True)],
    [(False, True, False)],
    [(False, False, True), (True, False, False)],
    [(False, False, False)],
]

#: How often the best reply of a group has all three features. The rest of the time it is on topic
#: but either brushes the user off or is cut off, as the best of a few human replies often is: a
#: policy that only imitates the best replies inherits their flaws, and a reward model that learnt
#: the ranking can teach it to avoid them.
PERFECT_BEST = 0.3

#: How often a group holds near misses: its best reply itself, about another topic or about none.
#: Such a pair differs in the topic alone, so a reward model must learn that a good answer to another
#: question, or to no question in particular, is not a good answer.
NEAR_MISS = 0.9


def _ranked_replies(lang: str, topic: int, count: int, rng: random.Random) -> list[tuple[str, int]]:
    """``count`` replies of decreasing quality, with their ranks (0 = best)."""
    best = 0 if rng.random() < PERFECT_BEST else 1
    features = rng.choice(_LEVELS[best])
    parts = _parts(lang, topic, *features, rng)
    # Near misses: the best reply about another topic, or about none (a generic sentence), everything
    # else the same. A group of four or more holds both, the generic one ranked above the other
    # topic (vague beats wrong); a smaller group one of them.
    swapped = (features[0], False, features[2])
    near_miss = next(index for index, level in enumerate(_LEVELS) if swapped in level)
    lower = range(best + 1, len(_LEVELS))
    topics = TOPICS[lang]
    misses: list[_Parts] = []
    if rng.random() < NEAR_MISS:
        other = parts.about(topics[(topic + rng.randrange(1, len(topics))) % len(topics)], parts.template)
        generic = parts.about(None, rng.choice(GENERIC[lang]))
        misses = [generic, other] if count >= 4 else [generic] if rng.random() < GENERIC_MISS else [other]
    levels = sorted(rng.sample([level for level in lower if level != near_miss], count - 1 - len(misses)))
    replies = [parts.render()]
    for level in levels:
        if misses and level > near_miss:
            replies += [miss.render() for miss in misses]
            misses = []
        replies.append(make_reply(lang, topic, *rng.choice(_LEVELS[level]), rng))
    replies += [miss.render() for miss in misses]
    return [(reply, rank) for rank, reply in enumerate(replies)]


@dataclass(frozen=True)
class GoldScore:
    """The sample's rules applied to one answer: a point for each feature."""

    polite: bool
    """It opens with one of the polite openers of the prompt's language."""
    on_topic: bool
    """It names the prompt's topic, and no other topic."""
    proper_ending: bool
    """A closing sentence ends it (an answer cut off, or running on after its closing, has none)."""

    @property
    def total(self) -> int:
        return int(self.polite) + int(self.on_topic) + int(self.proper_ending)


def _fold(text: str) -> str:
    return " ".join(text.casefold().split())


# Longest first, so that a topic that contains another is found whole.
_TOPIC_PHRASES: list[tuple[str, str, int]] = sorted(
    ((_fold(topic), lang, index) for lang, topics in TOPICS.items() for index, topic in enumerate(topics)),
    key=lambda item: -len(item[0]),
)


def prompt_topic(prompt: str) -> tuple[str, int] | None:
    """(language, topic index) of a question in the sample's style, or None when it names no topic."""
    text = _fold(prompt)
    for phrase, lang, index in _TOPIC_PHRASES:
        if phrase in text:
            return lang, index
    return None


def judge(prompt: str, answer: str) -> GoldScore | None:
    """The gold score of ``answer`` to ``prompt`` (the last prompter turn), or None when the prompt is
    not one of the sample's questions, so the rules do not apply."""
    found = prompt_topic(prompt)
    if found is None:
        return None
    lang, index = found
    text = _fold(answer)
    polite = any(text.startswith(_fold(opener)) for opener in POLITE[lang])
    topic = _fold(TOPICS[lang][index])
    rest = text.replace(topic, " ")
    on_topic = topic in text and not any(phrase in rest for phrase, _, _ in _TOPIC_PHRASES)
    proper_ending = any(text.endswith(_fold(closing)) for closing in CLOSING[lang])
    return GoldScore(polite, on_topic, proper_ending)


def held_out_prompts(count: int | None = None, seed: int = DEFAULT_SEED) -> list[str]:
    """Questions in the sample's style (every language) that the shipped export never asks, in a fixed
    seeded order: prompts no stage has trained on, for judging policies."""
    asked: set[str] = set()
    for tree in iter_trees(SAMPLE_FILE):
        for message in _walk(tree.prompt):
            if message.role == "prompter":
                asked.add(message.text)
    prompts = sorted({template.format(t=topic) for lang in PROMPTS for template in PROMPTS[lang] for topic in TOPICS[lang]}
                     - asked)
    random.Random(f"{seed}:held-out").shuffle(prompts)
    return prompts if count is None else prompts[:count]


FEATURES = ("polite", "on_topic", "proper_ending")


def feature_pairs(prompt: str, rng: random.Random) -> dict[str, tuple[str, str]]:
    """For a question in the sample's style, one (with, without) pair of replies per feature: the two
    replies differ only in that feature, everything else drawn once. For measuring what a reward
    model has learnt of each rule on its own."""
    found = prompt_topic(prompt)
    if found is None:
        raise ValueError(f"not one of the sample's questions: {prompt!r}")
    lang, index = found
    features = {"polite": rng.random() < 0.5, "on_topic": rng.random() < 0.5, "proper_ending": rng.random() < 0.5}
    on = _Parts(rng.choice(POLITE[lang]), rng.choice(BODY[lang]), TOPICS[lang][index], rng.choice(CLOSING[lang]), None)
    off = on.about(*_other_subject(lang, index, on.template, rng))
    rude = rng.choice(RUDE[lang])
    cut = rng.random()

    def reply(polite: bool, on_topic: bool, proper_ending: bool) -> str:
        parts = on if on_topic else off
        return _Parts(parts.opener if polite else rude, parts.template, parts.subject, parts.closing,
                      None if proper_ending else cut).render()

    return {feature: (reply(**{**features, feature: True}), reply(**{**features, feature: False})) for feature in FEATURES}


def _walk(message: Any) -> Any:
    yield message
    for reply in message.replies:
        yield from _walk(reply)


class _Ids:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def __call__(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))


def _node(ids: _Ids, parent: str | None, role: str, text: str, lang: str, rank: int | None, created: str) -> dict[str, Any]:
    return {
        "message_id": ids(),
        "parent_id": parent,
        "text": text,
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": True,
        "deleted": False,
        "rank": rank,
        "synthetic": False,
        "model_name": None,
        "emojis": {"+1": 1} if rank == 0 else {},
        "labels": {},
        "created_date": created,
        "replies": [],
    }


def make_tree(index: int, rng: random.Random, asked: dict[str, list[int]],
              questions: dict[tuple[str, int] | None, list[str]] | None = None) -> dict[str, Any]:
    """One tree; ``asked`` counts the prompts per topic of each language so far, so that every topic of
    every language is asked about about as often (a topic asked once is learnt by heart, not at all).
    With ``questions`` (by (language, topic), and every one under None), the tree asks one of those
    about its topic instead of a new one."""
    ids = _Ids(rng)
    lang = rng.choices(list(LANG_WEIGHTS), weights=list(LANG_WEIGHTS.values()))[0]
    counts = asked.setdefault(lang, [0] * len(TOPICS[lang]))
    topic = rng.choice([candidate for candidate, count in enumerate(counts) if count == min(counts)])
    counts[topic] += 1
    created = f"2023-{1 + index % 12:02d}-{1 + index % 28:02d}T{index % 24:02d}:00:00+00:00"
    prompt_text = rng.choice(PROMPTS[lang]).format(t=TOPICS[lang][topic])
    if questions is not None:
        prompt_text = rng.choice(questions.get((lang, topic)) or questions[None])
    prompt = _node(ids, None, "prompter", prompt_text, lang, None, created)
    for text, rank in _ranked_replies(lang, topic, rng.choice((3, 3, 4)), rng):
        prompt["replies"].append(_node(ids, prompt["message_id"], "assistant", text, lang, rank, created))
    if rng.random() < 0.3:
        best = prompt["replies"][0]
        follow = _node(ids, best["message_id"], "prompter", rng.choice(FOLLOW_UPS[lang]).format(t=TOPICS[lang][topic]), lang, 0, created)
        for text, rank in _ranked_replies(lang, topic, rng.choice((2, 3)), rng):
            follow["replies"].append(_node(ids, follow["message_id"], "assistant", text, lang, rank, created))
        best["replies"].append(follow)
    tree_state = "ready_for_export"
    roll = rng.random()
    if roll < 0.03:
        tree_state = "growing"
    elif roll < 0.05:
        tree_state = "aborted_low_grade"
    elif roll < 0.08:
        # A reviewer rejected the worst reply: it and its subtree are not used.
        prompt["replies"][-1]["review_result"] = False
    elif roll < 0.10:
        prompt["replies"][-1]["deleted"] = True
    return {
        "message_tree_id": prompt["message_id"],
        "tree_state": tree_state,
        "prompt": prompt,
        "origin": "oatui-sample",
    }


def generate(trees: int = DEFAULT_TREES, seed: int = DEFAULT_SEED) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    asked: dict[str, list[int]] = {}
    first = [make_tree(index, rng, asked) for index in range(min(trees, QUESTION_TREES))]
    questions: dict[tuple[str, int] | None, list[str]] = {None: sorted({tree["prompt"]["text"] for tree in first})}
    for question in questions[None]:
        questions.setdefault(prompt_topic(question), []).append(question)
    return first + [make_tree(index, rng, asked, questions) for index in range(len(first), trees)]


def write(path: Path, trees: int = DEFAULT_TREES, seed: int = DEFAULT_SEED) -> Path:
    lines = "".join(json.dumps(tree, ensure_ascii=False, sort_keys=True) + "\n" for tree in generate(trees, seed))
    data = lines.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        buffer = io.BytesIO()
        # mtime=0 and no file name in the header: the same bytes on every run.
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as handle:
            handle.write(data)
        data = buffer.getvalue()
    path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SAMPLE_FILE, help="output file (.jsonl or .jsonl.gz)")
    parser.add_argument("--trees", type=int, default=DEFAULT_TREES)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    print(write(args.out, args.trees, args.seed))


if __name__ == "__main__":
    main()
