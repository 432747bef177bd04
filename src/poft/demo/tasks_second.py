"""The second demo world's task suite: seven other families whose answers can be checked exactly.

Last letter of a word, each letter of a word shifted one step forward in the alphabet (z wraps to a), the
next number of an arithmetic sequence, the largest of some digits, a word without its vowels, a mixed-case
word with its case swapped, and the alphabet position of a word's first letter. Each family has several
phrasings, and each has far more distinct prompts than the held-out splits take (at least 600), so a
training split drawn outside them still covers every family. Words are pronounceable nonsense, as in the
first suite, but from their own generator: they may start with a vowel, so that vowel removal and the
alphabet position see every letter class. In every phrasing of a word family the word is the prompt's last
token (before its final punctuation), which the tests rely on to check answers independently.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from poft.demo.tasks import CONSONANTS, VOWELS, Example, Task, sample_examples

WORD_SEED = 7


def make_words(count: int, seed: int = WORD_SEED) -> list[str]:
    """Distinct words of 3 to 6 letters alternating consonants and vowels, starting with either."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < count:
        length, first = rng.randint(3, 6), rng.randrange(2)
        words.add("".join(rng.choice(CONSONANTS if (i + first) % 2 == 0 else VOWELS) for i in range(length)))
    return sorted(words)


def _word_task(phrasings: list[str], answer: Callable[[str], str]) -> Task:
    """A family asking about one word: a word, then a phrasing (in that order of draws), and `answer` of the word."""

    def task(rng: random.Random, words: list[str]) -> tuple[str, str]:
        word = rng.choice(words)
        return rng.choice(phrasings).format(w=word), answer(word)

    return task


_SHIFTED = str.maketrans(string.ascii_lowercase, string.ascii_lowercase[1:] + "a")
_last_letter = _word_task(
    ["What is the last letter of {w}?", "Give the final letter of {w}.", "Last letter: {w}"], lambda w: w[-1]
)
_shift = _word_task(
    ["Shift every letter one step forward: {w}", "Replace each letter by the next one: {w}", "Next letters of {w}."],
    lambda w: w.translate(_SHIFTED),
)


def _sequence(rng: random.Random, words: list[str]) -> tuple[str, str]:
    start, step, length = rng.randint(0, 30), rng.randint(1, 5), rng.randint(3, 4)
    terms = [start + step * i for i in range(length)]
    prompt = rng.choice(["Continue the sequence {s}.", "What comes after {s}?", "Next number: {s}"])
    return prompt.format(s=" ".join(map(str, terms))), str(terms[-1] + step)


def _max_digit(rng: random.Random, words: list[str]) -> tuple[str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    prompt = rng.choice(["What is the largest of {d}?", "Give the maximum of {d}.", "Biggest digit: {d}"])
    return prompt.format(d=" ".join(map(str, digits))), str(max(digits))


_no_vowels = _word_task(
    ["Remove the vowels from {w}.", "Write without vowels: {w}", "Drop every vowel of {w}."],
    lambda w: "".join(c for c in w if c not in VOWELS),
)


def _swap_case(rng: random.Random, words: list[str]) -> tuple[str, str]:
    word = "".join(c.upper() if rng.random() < 0.5 else c for c in rng.choice(words))
    prompt = rng.choice(["Swap the case of {w}.", "Invert upper and lower case: {w}", "Flip the case of {w}."])
    return prompt.format(w=word), "".join(c.lower() if c.isupper() else c.upper() for c in word)


_position = _word_task(
    [
        "Where in the alphabet is the first letter of {w}?",
        "Alphabet position of the first letter of {w}.",
        "Position of the initial of {w}:",
    ],
    lambda w: str(ord(w[0]) - ord("a") + 1),
)


FAMILIES: dict[str, Task] = {
    "last_letter": _last_letter,
    "shift": _shift,
    "sequence": _sequence,
    "max_digit": _max_digit,
    "no_vowels": _no_vowels,
    "swap_case": _swap_case,
    "position": _position,
}


def sample(
    count: int, seed: int, words: list[str], *, exclude: frozenset[str] = frozenset(), unique: bool = False
) -> list[Example]:
    """`tasks.sample_examples` over this suite's families."""
    return sample_examples(count, seed, words, exclude=exclude, unique=unique, families=FAMILIES)
