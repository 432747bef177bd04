"""A synthetic instruction suite whose answers can be checked exactly.

Seven families (add, subtract, reverse a word, sort digits, upper-case a phrase, count letters,
repeat a word) with several phrasings each. Words are pronounceable nonsense drawn from a seeded
generator, so nothing depends on an outside vocabulary. Every example is a single-turn chat plus its
`answer` and `family`, which `poft.evaluation.exact_match` checks.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from poft.schema import MESSAGES

FAMILY = "family"  # the demo's column naming each row's task family
CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"

Task = Callable[[random.Random, list[str]], tuple[str, str]]


def make_words(count: int, seed: int) -> list[str]:
    """Distinct pronounceable words of 3 to 6 letters."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < count:
        length = rng.randint(3, 6)
        words.add("".join(rng.choice(CONSONANTS if i % 2 == 0 else VOWELS) for i in range(length)))
    return sorted(words)


def _add(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    prompt = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]).format(a=a, b=b)
    return prompt, str(a + b)


def _subtract(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a = rng.randint(0, 49)
    b = rng.randint(0, a)
    prompt = rng.choice(["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."]).format(a=a, b=b)
    return prompt, str(a - b)


def _reverse(rng: random.Random, words: list[str]) -> tuple[str, str]:
    word = rng.choice(words)
    return rng.choice(["Reverse the word {w}.", "Write {w} backwards.", "Spell {w} in reverse."]).format(w=word), word[
        ::-1
    ]


def _sort(rng: random.Random, words: list[str]) -> tuple[str, str]:
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
    prompt = rng.choice(["Sort the digits {d}.", "Put {d} in ascending order."]).format(d=" ".join(digits))
    return prompt, " ".join(sorted(digits))


def _upper(rng: random.Random, words: list[str]) -> tuple[str, str]:
    phrase = " ".join(rng.sample(words, rng.randint(1, 2)))
    prompt = rng.choice(["Upper-case: {p}", "Write {p} in capitals.", "Make {p} uppercase."]).format(p=phrase)
    return prompt, phrase.upper()


def _count(rng: random.Random, words: list[str]) -> tuple[str, str]:
    word = rng.choice(words)
    return rng.choice(["How many letters are in {w}?", "Count the letters of {w}."]).format(w=word), str(len(word))


def _repeat(rng: random.Random, words: list[str]) -> tuple[str, str]:
    word, n = rng.choice(words), rng.randint(2, 3)
    return rng.choice(["Repeat {w} {n} times.", "Say {w} {n} times."]).format(w=word, n=n), " ".join([word] * n)


FAMILIES: dict[str, Task] = {
    "add": _add,
    "subtract": _subtract,
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
    "count": _count,
    "repeat": _repeat,
}


@dataclass(frozen=True)
class Example:
    family: str
    prompt: str
    answer: str

    def record(self) -> dict:
        """A chat row with its checkable answer."""
        return {
            MESSAGES: [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}],
            "answer": self.answer,
            FAMILY: self.family,
        }


def sample_examples(
    count: int,
    seed: int,
    words: list[str],
    *,
    exclude: frozenset[str] = frozenset(),
    unique: bool = False,
    families: dict[str, Task] | None = None,
) -> list[Example]:
    """`count` examples cycling through `families` (this suite's by default), never drawing a prompt in `exclude`
    (the held-out set).

    `unique` forbids repeated prompts, for a test split.
    """
    families = FAMILIES if families is None else families
    rng = random.Random(seed)
    names = list(families)
    examples: list[Example] = []
    seen = set(exclude)
    while len(examples) < count:
        family = names[len(examples) % len(names)]
        prompt, answer = families[family](rng, words)
        if prompt in seen:
            continue
        if unique:
            seen.add(prompt)
        examples.append(Example(family, prompt, answer))
    return examples


def alphabet() -> str:
    """Every character the suite (and the noise recipes) can produce."""
    return string.ascii_letters + string.digits + " ?.,:+-'\n"
