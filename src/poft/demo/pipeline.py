"""`poft demo`: PoFT against SFT on noisy data, end to end on a CPU, with nothing downloaded.

The world: a task suite with checkable answers (`poft.demo.tasks`), two references with different
tokenizers and chat templates (character-level ChatML with generation markers, byte-level BPE Zephyr
without) trained with SFT on a clean split, and a target base briefly pretrained on plain text. The run
noises the target split (`poft.noise`), scores it with `score_dataset`, trains SFT and PoFT (and the
baselines asked for) from the same base with identical settings through `PoFTTrainer`, and evaluates
greedy exact match on held-out prompts. Every PoFT - other difference is paired (same seed, same data,
same prompts) and reported with a 95% interval over seeds and a bootstrap interval over prompts
(`poft.demo.intervals`); a difference whose interval contains zero is reported as no measurable difference.

The world (references, base) is cached under the cache directory keyed by its settings, and every
finished run is saved under the output directory, so a second run reuses both and an interrupted grid
resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from poft.audit import auc
from poft.demo import tasks_second
from poft.demo.analysis import DPO_SUFFIX, SWEPT, arm_lr, best_learning_rates, check_method, has_own_loss, summarise
from poft.demo.builders import bpe_tokenizer, char_tokenizer, save_model, tiny_llama
from poft.demo.builders_second import gemma_char_tokenizer, unigram_tokenizer, wordpiece_tokenizer
from poft.demo.methods import (
    DPO_BETA,
    DPO_EPOCHS,
    DPO_LEARNING_RATE,
    DPO_NLL_WEIGHT,
    DPO_PAIRS,
    DPOSettings,
    preference_pairs,
    token_cleaning_data,
    token_cleaning_reference,
)
from poft.demo.report import write_demo_report
from poft.demo.runs import RunSpec, RunStore, TrainSettings, answers_correct, dpo_run, train_run
from poft.demo.settings import MAX_LENGTH, describe_rows, quiet, trainer_args
from poft.demo.tasks import Example, alphabet, make_words, sample_examples
from poft.errors import OptionError
from poft.filtering import filter_by_score, ifd_scores
from poft.noise import add_noise
from poft.objective_registry import SFT, SFT_NORM
from poft.options import device_field
from poft.outputs import atomic_write_text
from poft.runtime import cache_root, progress_bars_on_terminal_only, resolve_device
from poft.schema import IFD, MESSAGES, NOISE, POFT_ID, REF_SCORE, conversation_id
from poft.scoring import ScoreConfig, score_dataset
from poft.trainer import DEFAULT_OBJECTIVE, PoFTConfig, PoFTTrainer

logger = logging.getLogger(__name__)

WORLD_VERSION = 3  # bump when the world's construction changes, to invalidate cached models
WORLD_LEARNING_RATE = 1e-3  # references and base; the target's learning rate is --learning_rate
METHODS = (
    *SWEPT,
    "oracle",
    "filter",
    "token_cleaning",
    "ifd",
    "sft+dpo",
    "poft_token+dpo",
)
SECOND = "second"  # the world of other task families, tokenizers and templates (tasks_second, builders_second)
SECOND_WORLD_VERSION = 1  # bump when the second world's construction changes
WORLDS = ("standard", "strong", "misaligned", SECOND)
FULL_WORLDS = ("standard", "strong", "misaligned")
REFERENCES = {SECOND: ("ref-unigram", "ref-wordpiece")}  # every other world: ("ref-char", "ref-bpe")
NOISE_KINDS = ("paper", "subtle")
FULL_SEEDS = 10
SECOND_EPOCHS = 20  # the second world's target epochs, chosen on its validation prompts (bench/RESULTS.md)


@dataclass
class DemoConfig:
    """Options of `poft demo`."""

    output: str = field(default="poft-demo", metadata={"help": "Directory for report.md, the plots and results.json."})
    noise_rate: list[float] = field(
        default_factory=lambda: [0.6], metadata={"help": "Share of target rows to corrupt; several values run a grid."}
    )
    noise_kind: list[str] = field(
        default_factory=lambda: ["paper"],
        metadata={"help": "paper (swapped, corrupted responses) and/or subtle (one plausible edit)."},
    )
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Seeds of the noise and of training; differences are paired by seed."},
    )
    methods: list[str] = field(
        default_factory=lambda: [SFT.name, DEFAULT_OBJECTIVE],
        metadata={
            "help": "sft (token-level), poft (the paper's objective), poft_token (token-weighted PoFT), poft_calibrated "
            "(token-weighted PoFT against r_ref + H_ref), dft (TRL's "
            "Dynamic Fine-Tuning), sft_norm (length-normalised SFT), oracle (SFT on the clean rows only), filter (SFT "
            "on the top --filter_fractions by ref_score), token_cleaning (SFT on the 0.6 share of response tokens a same-tokenizer "
            "reference learned most: Token Cleaning, fixed model), ifd (SFT on the top --filter_fractions by IFD, computed "
            "with the target's base, rows with IFD >= 1 dropped), sft+dpo and poft_token+dpo (then DPO on --dpo_pairs "
            "correct-over-noised pairs on fresh prompts, at the --dpo_* settings). A PoFT objective at another Bradley-Terry scale: "
            "NAME@beta=B, e.g. poft_token@beta=0.5."
        },
    )
    baselines: bool = field(
        default=False, metadata={"help": "Add sft_norm, oracle and filter to --methods (where there is noise)."}
    )
    worlds: list[str] = field(
        default_factory=lambda: ["standard"],
        metadata={
            "help": "standard (references: --reference_rows clean rows, --reference_epochs), strong "
            "(--strong_reference_rows, --strong_reference_epochs: references meant to stay ahead of the target) and/or "
            "misaligned (the standard references' rows with --misaligned_noise_rate of the paper's noise) and/or second "
            "(other task families, tokenizers and chat templates; its target trains for --second_epochs)."
        },
    )
    conditions: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Noise settings as KIND:RATE (e.g. clean subtle:0.3 paper:0.6), instead of every --noise_kind at "
            "every --noise_rate."
        },
    )
    epochs: int = field(default=10, metadata={"help": "Training epochs of the target."})
    second_epochs: int = field(
        default=SECOND_EPOCHS,
        metadata={"help": "Training epochs of the target in the second world (chosen on its validation prompts)."},
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the target runs (all methods)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule of the target runs."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of the target's steps spent warming up."})
    lr_sweep: list[float] = field(
        default_factory=list,
        metadata={
            "help": "Learning rates to sweep on clean data first (sft, poft, sft_norm, --sweep_seeds); each method "
            "then also runs at its best, chosen on the validation split."
        },
    )
    sweep_seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Seeds of the sweep."})
    full: bool = field(
        default=False,
        metadata={
            "help": f"The complete grid: noise {{0, 0.3, 0.6}} x {{paper, subtle}} x {FULL_SEEDS} seeds, every "
            "method, an lr sweep, both worlds. Resumable; split it over processes with --workers."
        },
    )
    workers: int = field(default=1, metadata={"help": "Processes training runs in parallel (1: in this process)."})
    device: str = device_field()
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the world (references, base) is cached (default: $POFT_CACHE/demo or ~/.cache/poft/demo)."
        },
    )
    target_rows: int = field(default=1800, metadata={"help": "Rows of the target's training split."})
    reference_rows: int = field(default=4000, metadata={"help": "Rows of the references' clean training split."})
    validation_rows: int = field(
        default=210, metadata={"help": "Validation prompts (learning-rate choice, curves), never in the test set."}
    )
    test_rows: int = field(default=700, metadata={"help": "Held-out test prompts (100 per task family)."})
    hidden_size: int = field(default=128, metadata={"help": "Width of every model."})
    num_layers: int = field(default=2, metadata={"help": "Layers of every model."})
    batch_size: int = field(default=32, metadata={"help": "Batch size of the target runs."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping of the target runs."})
    reference_epochs: int = field(default=6, metadata={"help": "SFT epochs of each standard reference."})
    strong_reference_rows: int = field(default=8000, metadata={"help": "Clean rows of each strong reference."})
    strong_reference_epochs: int = field(default=12, metadata={"help": "SFT epochs of each strong reference."})
    misaligned_noise_rate: float = field(
        default=0.6, metadata={"help": "Share of the misaligned references' training rows with the paper's noise."}
    )
    filter_fractions: list[float] = field(
        default_factory=lambda: [0.4, 0.7],
        metadata={"help": "Fractions kept by the ref_score filter baseline (the best is compared)."},
    )
    dpo_pairs: int = field(
        default=DPO_PAIRS,
        metadata={"help": "Preference pairs of the +dpo methods' DPO stage, on prompts no other split uses."},
    )
    dpo_learning_rate: float = field(
        default=DPO_LEARNING_RATE,
        metadata={"help": "Learning rate of the DPO stage (chosen on the validation prompts: bench/RESULTS.md)."},
    )
    dpo_beta: float = field(default=DPO_BETA, metadata={"help": "DPO's beta, the KL strength (chosen likewise)."})
    dpo_epochs: int = field(default=DPO_EPOCHS, metadata={"help": "Epochs of the DPO stage over its pairs."})
    dpo_nll_weight: float = field(
        default=DPO_NLL_WEIGHT,
        metadata={"help": "Weight of an NLL term on the chosen answers in the DPO stage (0: plain DPO)."},
    )

    def __post_init__(self):
        if self.full:
            self.noise_rate, self.noise_kind = [0.0, 0.3, 0.6], ["subtle", "paper"]
            self.methods, self.worlds = list(METHODS), list(FULL_WORLDS)
            self.lr_sweep = self.lr_sweep or [5e-4, 1e-3, 2e-3]
            if self.seeds == [0]:
                self.seeds = list(range(FULL_SEEDS))
        if self.baselines:
            self.methods += [m for m in (SFT_NORM.name, "oracle", "filter") if m not in self.methods]
        if any(not 0.0 <= r < 1.0 for r in self.noise_rate):
            raise OptionError(f"--noise_rate values must be in [0, 1), got {self.noise_rate}")
        for name in ("dpo_pairs", "dpo_epochs"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("dpo_learning_rate", "dpo_beta"):
            if not getattr(self, name) > 0:
                raise OptionError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.dpo_nll_weight < 0:
            raise OptionError(f"--dpo_nll_weight must be 0 (plain DPO) or positive, got {self.dpo_nll_weight}")
        wrong = [problem for problem in (check_method(m, METHODS) for m in self.methods) if problem]
        if wrong:
            raise OptionError(f"--methods {'; '.join(wrong)}")
        for name, values, allowed in (
            ("worlds", self.worlds, WORLDS),
            ("noise_kind", self.noise_kind, NOISE_KINDS),
        ):
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise OptionError(f"--{name} {' '.join(unknown)}: choose from {', '.join(allowed)}")
        for condition in self.conditions:
            kind, _, rate = condition.partition(":")
            if condition != "clean" and (kind not in NOISE_KINDS or not _is_rate(rate)):
                raise OptionError(
                    f"--conditions {condition}: give clean or KIND:RATE with KIND {' or '.join(NOISE_KINDS)} and RATE "
                    "in (0, 1), e.g. subtle:0.3"
                )
        for name, epochs in (("epochs", self.epochs), ("second_epochs", self.second_epochs)):
            if epochs < 1:
                raise OptionError(f"--{name} must be at least 1, got {epochs}")
        if self.workers < 1:
            raise OptionError(f"--workers must be at least 1, got {self.workers}")

    def world_key(self, world: str = "standard") -> str:
        rows, epochs = self.reference_rows, self.reference_epochs
        if world == "strong":
            rows, epochs = self.strong_reference_rows, self.strong_reference_epochs
        settings = [
            WORLD_VERSION,
            self.target_rows,
            rows,
            self.validation_rows,
            self.test_rows,
            self.hidden_size,
            self.num_layers,
            epochs,
        ]
        if world == "misaligned":
            settings.append(["misaligned", self.misaligned_noise_rate])
        if world == SECOND:
            settings.append([SECOND, SECOND_WORLD_VERSION])
        return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]

    def train_settings(self, world: str = "standard") -> TrainSettings:
        """The target's settings in `world`: the second world has its own epochs, part of its runs' identity."""
        return TrainSettings(
            epochs=self.second_epochs if world == SECOND else self.epochs,
            batch_size=self.batch_size,
            lr_scheduler_type=self.lr_scheduler_type,
            warmup_ratio=self.warmup_ratio,
            max_grad_norm=self.max_grad_norm,
            use_cpu=self.use_cpu(),
        )

    def dpo_settings(self) -> DPOSettings:
        """The DPO stage of the +dpo methods (part of their runs' identity only)."""
        return DPOSettings(self.dpo_pairs, self.dpo_learning_rate, self.dpo_beta, self.dpo_epochs, self.dpo_nll_weight)

    def use_cpu(self) -> bool:
        """Whether --device resolves to the CPU (transformers' `use_cpu`)."""
        return resolve_device(self.device).type == "cpu"


@dataclass
class World:
    name: str
    key: str
    train: Dataset
    validation: Dataset
    test: Dataset
    references: list[str]
    base: str
    reference_data: Dataset  # what the references trained on (noised in the misaligned world)
    words: list[str]  # the task suite's vocabulary, for drawing more prompts of the same world
    reference_accuracy: dict[str, float] = field(default_factory=dict)


def _rows(examples) -> Dataset:
    records = [e.record() for e in examples]
    for r in records:
        r[POFT_ID] = conversation_id(r[MESSAGES])
    return Dataset.from_list(records)


def _world_args(output_dir: Path, config: DemoConfig, *, epochs: int, seed: int) -> PoFTConfig:
    return trainer_args(
        PoFTConfig,
        output_dir,
        epochs=epochs,
        batch_size=config.batch_size,
        learning_rate=WORLD_LEARNING_RATE,
        seed=seed,
        use_cpu=config.use_cpu(),
        objective=SFT.name,
        lr_scheduler_type="constant",
        logging_steps=50,
    )


def world_examples(config: DemoConfig, name: str = "standard") -> dict[str, list[Example]]:
    """The splits of a world: test and validation prompts (unique, disjoint), and the references', the target's
    and the base's pretraining rows, drawn outside both.

    The second world draws them from its own task families (`tasks_second`); the others share the first suite's.
    """
    second = name == SECOND
    words = tasks_second.make_words(200) if second else make_words(200, seed=0)
    draw = tasks_second.sample if second else sample_examples
    test = draw(config.test_rows, seed=1, words=words, unique=True)
    validation = draw(
        config.validation_rows, seed=5, words=words, unique=True, exclude=frozenset(e.prompt for e in test)
    )
    held_out = frozenset(e.prompt for e in test + validation)
    reference_rows = config.strong_reference_rows if name == "strong" else config.reference_rows
    return {
        "test": test,
        "validation": validation,
        "reference": draw(reference_rows, seed=2, words=words, exclude=held_out),
        "train": draw(config.target_rows, seed=3, words=words, exclude=held_out),
        "pretrain": draw(config.reference_rows, seed=4, words=words, exclude=held_out),
    }


def build_world(config: DemoConfig, name: str = "standard") -> World:
    """Data splits, two references trained on clean data, and a pretrained target base (cached).

    The standard, strong and misaligned worlds share the splits and the target base; the strong one trains its
    references on more clean rows for more epochs, the misaligned one on the standard rows with the paper's noise
    in some of them. The second world has its own splits (`world_examples`), and other tokenizers and chat
    templates for its references and target (`builders_second`).
    """
    examples = world_examples(config, name)
    root = (Path(config.cache_dir) if config.cache_dir else cache_root() / "demo") / f"world-{config.world_key(name)}"
    world = _world(config, name, examples, root)
    if (root / "done").exists():
        logger.info("Reusing the cached %s world in %s", name, root)
        world.reference_accuracy = json.loads((root / "done").read_text())["reference_accuracy"]
        return world
    tokenizers, base_tokenizer = _world_tokenizers(name, examples["reference"])
    _train_references(config, world, tokenizers, root)
    _pretrain_base(config, base_tokenizer, examples["pretrain"], root)
    shutil.rmtree(root / "tmp", ignore_errors=True)
    atomic_write_text(
        root / "done", json.dumps({"config": asdict(config), "reference_accuracy": world.reference_accuracy})
    )
    return world


def _world(config: DemoConfig, name: str, examples: dict[str, list[Example]], root: Path) -> World:
    """The world's splits as datasets, and where its references and base live under `root`."""
    words = tasks_second.make_words(200) if name == SECOND else make_words(200, seed=0)
    reference_data = _rows(examples["reference"])
    if name == "misaligned":
        reference_data = add_noise(reference_data, config.misaligned_noise_rate, kind="paper", seed=100)
    return World(
        name=name,
        key=config.world_key(name),
        train=_rows(examples["train"]),
        validation=_rows(examples["validation"]),
        test=_rows(examples["test"]),
        references=[str(root / reference) for reference in REFERENCES.get(name, ("ref-char", "ref-bpe"))],
        base=str(root / "base"),
        reference_data=reference_data,
        words=words,
    )


def _world_tokenizers(
    name: str, reference_examples: list[Example]
) -> tuple[dict[str, PreTrainedTokenizerFast], PreTrainedTokenizerFast]:
    """Each reference's tokenizer, by its directory name, and the target base's tokenizer."""
    texts = [t for e in reference_examples for t in (e.prompt, e.answer)]
    if name == SECOND:
        tokenizers = {
            "ref-unigram": unigram_tokenizer(texts, alphabet()),
            "ref-wordpiece": wordpiece_tokenizer(texts, alphabet()),
        }
        return tokenizers, gemma_char_tokenizer(alphabet())
    tokenizers = {"ref-char": char_tokenizer(alphabet()), "ref-bpe": bpe_tokenizer(texts, vocab_size=400)}
    return tokenizers, tokenizers["ref-char"]


def _train_references(
    config: DemoConfig, world: World, tokenizers: dict[str, PreTrainedTokenizerFast], root: Path
) -> None:
    """Train and save each reference on the world's reference data; record its exact match on the test prompts."""
    epochs = config.strong_reference_epochs if world.name == "strong" else config.reference_epochs
    for index, (reference, tokenizer) in enumerate(tokenizers.items()):
        logger.info(
            "Training reference %s on %s for %d epochs", reference, describe_rows(world.reference_data), epochs
        )
        model = tiny_llama(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers, seed=10 + index)
        trainer = PoFTTrainer(
            model,
            args=_world_args(root / "tmp", config, epochs=epochs, seed=index),
            train_dataset=world.reference_data,
            processing_class=tokenizer,
        )
        quiet(trainer, f"Reference {reference}")
        trainer.train()
        save_model(trainer.model, tokenizer, root / reference)
        correct = answers_correct(trainer.model, tokenizer, world.test)
        world.reference_accuracy[reference] = sum(correct) / len(correct)
        logger.info(
            "Reference %s: %.1f%% exact match on the test prompts", reference, 100 * sum(correct) / len(correct)
        )


def _pretrain_base(
    config: DemoConfig, tokenizer: PreTrainedTokenizerFast, pretrain: list[Example], root: Path
) -> None:
    """The target's base: one epoch on the pretraining rows as plain text (no chat format), saved under `root`."""
    logger.info("Pretraining the target base on plain text (no chat format)")
    base = tiny_llama(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers, seed=20)
    plain = Dataset.from_dict({"text": [f"{e.prompt} {e.answer}" for e in pretrain]})
    args = trainer_args(
        SFTConfig,
        root / "tmp",
        epochs=1,
        batch_size=config.batch_size,
        learning_rate=WORLD_LEARNING_RATE,
        seed=0,
        use_cpu=config.use_cpu(),
        bf16=False,
        logging_steps=50,
    )
    trainer = SFTTrainer(base, args=args, train_dataset=plain, processing_class=tokenizer)
    quiet(trainer, "Target base")
    trainer.train()
    save_model(base, tokenizer, root / "base")


class Grid:
    """Runs specs through the run store: finished ones are loaded, the rest trained (in parallel when asked)."""

    def __init__(self, config: DemoConfig, worlds: dict[str, World], output: Path):
        self.config, self.worlds = config, worlds
        self.settings = config.train_settings()
        self.world_settings = {name: config.train_settings(name) for name in worlds}
        self.stores = {
            name: RunStore(output, self.world_settings[name].fingerprint(w.key)) for name, w in worlds.items()
        }
        ours = {store.directory for store in self.stores.values()}
        others = sorted(d.name for d in (output / "runs").glob("*") if d not in ours and any(d.glob("*.json")))
        if others:
            logger.info(
                "%s holds runs of other code or settings (%s): they are not reused; these runs train again",
                output / "runs",
                ", ".join(others),
            )
        self.score_config = ScoreConfig(device=config.device, max_length=MAX_LENGTH)
        self.scored: dict[tuple, Dataset] = {}
        self.separation: list[dict] = []
        self.distributions: dict[str, dict] = {}
        self.pairs: dict[tuple[str, int], Dataset] = {}  # the DPO pairs of a world, by their number

    def scored_data(self, world: str, kind: str, rate: float, seed: int) -> Dataset:
        """The target split with noise of `kind` at `rate`, scored by the world's references (cached)."""
        key = (world, kind, rate, seed)
        if key not in self.scored:
            w = self.worlds[world]
            noised = (
                add_noise(w.train, rate, kind=kind, seed=seed)
                if rate > 0
                else w.train.add_column(NOISE, [False] * len(w.train))
            )
            cache = str(Path(w.base).parent / "scores")
            scored = score_dataset(
                noised, w.references, ScoreConfig(**{**asdict(self.score_config), "cache_dir": cache})
            )
            noisy = scored[NOISE]
            if any(noisy):
                clean_scores = [s for s, n in zip(scored[REF_SCORE], noisy, strict=True) if not n]
                noisy_scores = [s for s, n in zip(scored[REF_SCORE], noisy, strict=True) if n]
                self.separation.append(
                    {
                        "world": world,
                        "noise_kind": kind,
                        "noise_rate": rate,
                        "seed": seed,
                        "auc": auc(clean_scores, noisy_scores),
                    }
                )
                self.distributions.setdefault(
                    f"{world} {kind} {rate:g}", {"clean": clean_scores, "noisy": noisy_scores}
                )
            self.scored[key] = scored
        return self.scored[key]

    def training_data(self, spec: RunSpec) -> tuple[Dataset, Dataset]:
        """What the run trains on, and the fixed 400-row sample its weights are measured on."""
        scored = self.scored_data(spec.world, spec.noise_kind, spec.noise_rate, spec.seed)
        sample = scored.shuffle(seed=0).select(range(min(400, len(scored))))
        if spec.method == "oracle":
            return scored.filter(lambda n: not n, input_columns=NOISE), sample
        if spec.method.startswith("filter"):
            keep = max(1, math.ceil(float(spec.method.removeprefix("filter")) * len(scored)))
            return scored.sort(REF_SCORE, reverse=True).select(range(keep)), sample
        if spec.method.startswith("ifd"):
            cache = str(Path(self.worlds[spec.world].base).parent / "scores")
            options = ScoreConfig(**{**asdict(self.score_config), "cache_dir": cache})
            with_ifd = scored.add_column(IFD, ifd_scores(scored, self.worlds[spec.world].base, options))
            fraction = float(spec.method.removeprefix("ifd"))
            return filter_by_score(with_ifd, IFD, top_fraction=fraction, drop_at_or_above=1.0)[0], sample
        if spec.method == "token_cleaning":
            world = self.worlds[spec.world]
            strong = spec.world == "strong"
            epochs = self.config.strong_reference_epochs if strong else self.config.reference_epochs
            scratch = Path(world.base).parent / "tmp-token-cleaning"
            reference = token_cleaning_reference(world, _world_args(scratch, self.config, epochs=epochs, seed=2))
            return token_cleaning_data(scored, world.base, reference), sample
        return scored, sample

    def _job(self, spec: RunSpec, save_to: Path | None = None) -> tuple:
        """The function that trains `spec` and its arguments: a `+dpo` arm's DPO stage starts from its first stage's
        saved model; every other run from the base."""
        world, settings, store = self.worlds[spec.world], self.world_settings[spec.world], self.stores[spec.world]
        if spec.dpo is None:
            data, sample = self.training_data(spec)
            return train_run, (spec, settings, world.base, data, sample, world.validation, world.test, save_to)
        first = spec.first_stage()
        sample = self.training_data(first)[1]
        key = (spec.world, spec.dpo.pairs)
        if key not in self.pairs:
            self.pairs[key] = preference_pairs(world, spec.dpo.pairs)
        arguments = (store.model_path(first), store.load(first), self.pairs[key], sample, world.validation, world.test)
        return dpo_run, (spec, settings, *arguments)

    def run(self, specs: list[RunSpec]) -> list[dict]:
        """Records of every spec, in order; logs progress and the estimated time left.

        The runs a pending `+dpo` arm starts from run first (again, if their model was not kept), saving their model;
        then the DPO stages, each from its first stage's model, so that several DPO settings share one first stage."""
        records: dict[RunSpec, dict] = {}
        pending = []
        for spec in dict.fromkeys(specs):
            record = self.stores[spec.world].load(spec)
            if record is None:
                pending.append(spec)
            else:
                records[spec] = record
        if records:
            logger.info(
                "%d of %d runs already finished (in %s)",
                len(records),
                len(records) + len(pending),
                ", ".join(str(store.directory) for store in self.stores.values()),
            )
        stages = [s for s in pending if s.dpo is not None]
        keep = {s.first_stage() for s in stages if not self._first_stage_kept(s.first_stage())}
        first = [s for s in pending if s.dpo is None] + [s for s in keep if s not in pending]
        total, started, done = len(first) + len(stages), time.perf_counter(), 0

        def finished(spec: RunSpec, record: dict) -> None:
            nonlocal done
            done += 1
            self.stores[spec.world].save(spec, record)
            records[spec] = record
            left = (time.perf_counter() - started) / done * (total - done)
            logger.info(
                "[%d/%d] %s: test %.1f%% (%.0f s); about %.0f min left",
                done,
                total,
                spec.name,
                100 * record["test_accuracy"],
                record["seconds"],
                left / 60,
            )

        for phase in (first, stages):
            self._execute(phase, lambda spec: self._job(spec, self._model_path(spec, keep)), finished)
        return [records[spec] for spec in dict.fromkeys(specs)]

    def _first_stage_kept(self, first: RunSpec) -> bool:
        """Whether a first stage's run and its model are both in the store (a kill between the two leaves one)."""
        store = self.stores[first.world]
        return store.model_path(first).is_dir() and store.load(first) is not None

    def _model_path(self, spec: RunSpec, keep: set[RunSpec]) -> Path | None:
        if spec not in keep:
            return None
        path = self.stores[spec.world].model_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _execute(
        self, specs: list[RunSpec], job: Callable[[RunSpec], tuple], finished: Callable[[RunSpec, dict], None]
    ) -> None:
        """Each spec's `job(spec)` (its function and arguments: `_job`) in this process or over the worker pool;
        `finished` gets each spec's record."""
        if self.config.workers == 1 or len(specs) <= 1:
            for spec in specs:
                function, arguments = job(spec)
                finished(spec, function(*arguments))
            return
        with worker_pool(self.config.workers) as pool:
            # each run is submitted as soon as its data is scored, so the workers start while the rest is scored
            futures = {}
            for spec in specs:
                function, arguments = job(spec)
                futures[pool.submit(function, *arguments)] = spec
            for future in as_completed(futures):
                finished(futures[future], future.result())


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Fresh (spawned) processes for training runs, each quiet as the command line is: no progress bars where
    stderr is not a terminal."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=progress_bars_on_terminal_only)


def _methods(config: DemoConfig, rate: float) -> list[str]:
    """Method names of one setting: the filter baselines expand to their fractions; the ref_score filter and the
    oracle need noise."""
    names = []
    for method in config.methods:
        if method in ("oracle", "filter") and rate == 0:
            continue
        names += [f"{method}{f:g}" for f in config.filter_fractions] if method in ("filter", "ifd") else [method]
    return names


def _is_rate(text: str) -> bool:
    try:
        return 0.0 < float(text) < 1.0
    except ValueError:
        return False


def _settings(config: DemoConfig) -> list[tuple[str, float]]:
    """(kind, rate) pairs: --conditions as given, else clean data once, then every kind at every positive rate."""
    if config.conditions:
        return [
            ("none", 0.0) if c == "clean" else (c.split(":")[0], float(c.split(":")[1])) for c in config.conditions
        ]
    settings = [("none", 0.0)] if 0.0 in config.noise_rate else []
    return settings + [(k, r) for k in config.noise_kind for r in config.noise_rate if r > 0]


def plan_grid(config: DemoConfig, best_lr: dict[str, float]) -> list[RunSpec]:
    """Every run of the grid at the shared learning rate and, after a sweep, at each method's best."""
    specs = []
    for world in config.worlds:
        for kind, rate in _settings(config):
            for seed in config.seeds:
                for method in _methods(config, rate):
                    lrs = {config.learning_rate, arm_lr(method, best_lr, config.learning_rate)}
                    dpo = config.dpo_settings() if method.endswith(DPO_SUFFIX) else None
                    specs += [RunSpec(world, kind, rate, seed, method, lr, dpo) for lr in sorted(lrs)]
    return specs


def run_demo(config: DemoConfig) -> dict:
    """Build (or reuse) the worlds, run the sweep and the grid (resuming), write results.json and the report."""
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    worlds = {name: build_world(config, name) for name in config.worlds}
    grid = Grid(config, worlds, output)
    sweep: list[dict] = []
    best_lr: dict[str, float] = {}
    if config.lr_sweep:
        world = config.worlds[0]
        swept = [m for m in config.methods if has_own_loss(m)]
        if any(not has_own_loss(m) for m in config.methods) and SFT.name not in swept:
            swept.append(SFT.name)
        specs = [
            RunSpec(world, "none", 0.0, seed, method, lr)
            for seed in config.sweep_seeds
            for method in swept
            for lr in config.lr_sweep
        ]
        logger.info("Learning-rate sweep on clean data: %d runs", len(specs))
        sweep = grid.run(specs)
        best_lr = best_learning_rates(sweep)
        logger.info("Best learning rates on the validation split: %s", best_lr)
    specs = plan_grid(config, best_lr)
    logger.info("The grid: %d runs", len(specs))
    records = grid.run(specs)
    for spec in specs:  # the references' separation of clean from noisy rows, also when every run was resumed
        if spec.noise_rate > 0:
            grid.scored_data(spec.world, spec.noise_kind, spec.noise_rate, spec.seed)
    results = {
        "config": asdict(config),
        "train_settings": asdict(grid.settings),
        "world_epochs": {name: settings.epochs for name, settings in grid.world_settings.items()},
        "reference_accuracy": {name: w.reference_accuracy for name, w in worlds.items()},
        "best_learning_rates": best_lr,
        "sweep": [_without_answers(r) for r in sweep],
        "runs": records,
        "separation": grid.separation,
        "summary": summarise(records, config.learning_rate, best_lr),
    }
    atomic_write_text(output / "results.json", json.dumps(results, indent=2))
    write_demo_report(results, grid.distributions, output)
    return results


def _without_answers(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "test_correct"}
