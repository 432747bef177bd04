"""Inject noise into SFT data, seeded, marking each row it changed.

`paper`: the recipe of the PoFT paper. A chosen fraction of rows take the responses of another randomly
chosen row (a prompt paired with a mismatched answer), then their characters are corrupted by random
insertion, deletion and substitution. References separate such rows from clean ones almost perfectly.

`subtle`: one small edit per response that keeps it plausible: a number off by one, two neighbouring
words swapped, or one letter changed. References cannot separate these perfectly, which is where PoFT
has to be more than a data filter.

Only assistant turns change; prompts stay as they are. `poft_noise` is true exactly for the rows whose
content changed (a chosen row whose draw left it as it was is drawn again, a few times) and `poft_id` is
recomputed, since the content changed.
"""

from __future__ import annotations

import logging
import random
import re
import string
from dataclasses import dataclass, field

from datasets import Dataset

from poft.errors import OptionError
from poft.schema import CONTENT_SCORES, MESSAGES, NOISE, POFT_ID, conversation_id
from poft.stage import StageIO, open_stage

logger = logging.getLogger(__name__)

NOISE_KINDS = ("paper", "subtle")
ATTEMPTS = 10  # draws per chosen row before it is left clean (a row whose every donor and edit reproduce it)


@dataclass
class NoiseConfig(StageIO):
    """Options of `poft noise`."""

    rate: float = field(default=0.3, metadata={"help": "Fraction of rows to corrupt, in [0, 1]."})
    kind: str = field(
        default="paper",
        metadata={
            "help": "paper: swapped responses plus character edits; subtle: one plausible small edit.",
            "choices": list(NOISE_KINDS),
        },
    )
    char_rate: float = field(
        default=0.1, metadata={"help": "paper noise: share of characters inserted, deleted or substituted."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed: the same seed and data give the same noise."})

    def __post_init__(self):
        if not 0.0 <= self.rate <= 1.0:
            raise OptionError(f"--rate must be in [0, 1], got {self.rate}")
        if self.kind not in NOISE_KINDS:
            raise OptionError(f"--kind must be one of {NOISE_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.char_rate <= 1.0:
            raise OptionError(f"--char_rate must be in [0, 1], got {self.char_rate}")


ALPHABET = string.ascii_letters + string.digits + " "


def corrupt_characters(text: str, rate: float, rng: random.Random) -> str:
    """Each character is, with probability `rate`, deleted, substituted or followed by an inserted one."""
    out = []
    for char in text:
        if rng.random() >= rate:
            out.append(char)
            continue
        edit = rng.randrange(3)
        if edit == 1:
            out.append(rng.choice(ALPHABET))
        elif edit == 2:
            out.extend((char, rng.choice(ALPHABET)))
    return "".join(out) or rng.choice(ALPHABET)


def subtle_edit(text: str, rng: random.Random) -> str:
    """One plausible edit: a number off by one, else two neighbouring words swapped, else one letter changed."""
    numbers = list(re.finditer(r"\d+", text))
    if numbers:
        match = rng.choice(numbers)
        value = int(match.group())
        value = value + 1 if value == 0 or rng.random() < 0.5 else value - 1
        return text[: match.start()] + str(value) + text[match.end() :]
    words = text.split(" ")
    pairs = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
    if pairs:
        i = rng.choice(pairs)
        words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    if not letters:
        return text + rng.choice(string.ascii_lowercase)
    i = rng.choice(letters)
    pool = string.ascii_uppercase if text[i].isupper() else string.ascii_lowercase
    return text[:i] + rng.choice(pool.replace(text[i], "")) + text[i + 1 :]


def _responses(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


def _with_responses(messages: list[dict], responses: list[str]) -> list[dict]:
    replaced = iter(responses)
    return [{**m, "content": next(replaced)} if m["role"] == "assistant" else m for m in messages]


def _noised_responses(
    conversations: list[list[dict]], row: int, kind: str, char_rate: float, rng: random.Random
) -> list[str]:
    own = _responses(conversations[row])
    if kind == "paper":
        n = len(conversations)
        donor = rng.choice([i for i in range(n) if i != row]) if n > 1 else row
        donated = _responses(conversations[donor])
        return [corrupt_characters(donated[i % len(donated)], char_rate, rng) for i in range(len(own))]
    responses = list(own)
    turn = rng.randrange(len(own))
    responses[turn] = subtle_edit(own[turn], rng)
    return responses


def add_noise(dataset: Dataset, rate: float, *, kind: str = "paper", seed: int = 0, char_rate: float = 0.1) -> Dataset:
    """Corrupt round(rate * rows) randomly chosen rows; the others are returned unchanged, in order.

    A chosen row whose draw reproduces its own responses (a donor with the same answer, no character
    edit) is drawn again; `poft_noise` is true exactly for the rows that changed, here or in an earlier
    run whose `poft_noise` the dataset carries.
    """
    NoiseConfig(rate=rate, kind=kind, char_rate=char_rate)  # validates
    rng = random.Random(seed)
    n = len(dataset)
    if rate > 0 and round(rate * n) == 0:
        raise OptionError(
            f"--rate {rate:g} corrupts none of the {n} rows ({rate:g} x {n} rounds to 0); use --rate {1 / n:.4g} or "
            "more to corrupt at least one row."
        )
    chosen = set(rng.sample(range(n), round(rate * n)))
    conversations = dataset[MESSAGES]
    noised = []
    for row, messages in enumerate(conversations):
        if row in chosen:
            own = _responses(messages)
            for _ in range(ATTEMPTS):
                responses = _noised_responses(conversations, row, kind, char_rate, rng)
                if responses != own:
                    break
            messages = _with_responses(messages, responses)
        noised.append(messages)
    changed = [new != old for new, old in zip(noised, conversations, strict=True)]
    if NOISE in dataset.column_names:  # noised again: a row corrupted by either run is noise
        changed = [bool(now or before) for now, before in zip(changed, dataset[NOISE], strict=True)]
    dataset = dataset.map(
        lambda _, row: {MESSAGES: noised[row], POFT_ID: conversation_id(noised[row]), NOISE: changed[row]},
        with_indices=True,
        desc=f"Adding {kind} noise",
    )
    unchanged = len(chosen) - sum(changed)
    logger.info(
        "Corrupted %d of %d rows with %s noise (seed %d)%s",
        sum(changed),
        n,
        kind,
        seed,
        f"; {unchanged} chosen rows could not be changed and stay clean" if unchanged else "",
    )
    return dataset


def run_noise(config: NoiseConfig) -> Dataset:
    """`poft noise`: load, corrupt, save (atomically: see `poft.stage`).

    Scores poft computed for the input (`ref_score`, `ref_entropy` and each reference's columns, `ifd`) describe
    the responses before the noise, so they are dropped, with a warning, rather than carried over wrong.
    poft's own `poft_noise` is kept and ORed with the new marks.
    """
    stage = open_stage(config, "noise")
    return stage.write(
        [NOISE],
        lambda dataset: add_noise(
            dataset, config.rate, kind=config.kind, seed=config.seed, char_rate=config.char_rate
        ),
        stale=lambda c: c.startswith(CONTENT_SCORES),
        stale_reason="scores of the responses before the noise; score the noised data again.",
    )
