"""`poft demo`: PoFT against SFT on noisy data, end to end on a CPU, with nothing downloaded.

The world: a task suite with checkable answers (`poft.demo.tasks`), two references with different
tokenizers and chat templates (character-level ChatML with generation markers, byte-level BPE Zephyr
without) trained with SFT on a clean split, and a target base briefly pretrained on plain text. The run
noises the target split (`poft.noise`), scores it with `score_dataset`, trains SFT and PoFT from the
same base with identical settings through `PoFTTrainer`, and evaluates greedy exact match on held-out
prompts after every epoch. It reports what it measured, whichever way it comes out.

The world (references, base) is cached under the cache directory keyed by its settings, so a second
run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from poft.chat import ConversationEncoder
from poft.data import conversation_id
from poft.demo.builders import bpe_tokenizer, char_tokenizer, save_model, tiny_llama
from poft.demo.tasks import alphabet, make_words, sample_examples
from poft.errors import OptionError
from poft.evaluation import exact_match_accuracy
from poft.noise import NOISE_COLUMN, add_noise
from poft.objectives import poft_weights
from poft.outputs import atomic_write_text
from poft.report import auc, write_demo_report
from poft.runtime import cache_root, resolve_device
from poft.scoring import ScoreConfig, model_scores, score_dataset
from poft.trainer import PoFTConfig, PoFTTrainer

logger = logging.getLogger(__name__)

WORLD_VERSION = 2  # bump when the world's construction changes, to invalidate cached models


@dataclass
class DemoConfig:
    """Options of `poft demo`."""

    output: str = field(default="poft-demo", metadata={"help": "Directory for report.md, the plots and results.json."})
    noise_rate: list[float] = field(
        default_factory=lambda: [0.5], metadata={"help": "Share of target rows to corrupt; several values run a grid."}
    )
    noise_kind: list[str] = field(
        default_factory=lambda: ["paper"],
        metadata={"help": "paper (swapped, corrupted responses) and/or subtle (one plausible edit)."},
    )
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Seeds of the noise and of training; results are reported per seed."},
    )
    epochs: int = field(default=10, metadata={"help": "Training epochs of the target (evaluated after each)."})
    full: bool = field(
        default=False,
        metadata={"help": "The paper's grid: noise {0, 0.3, 0.6} x 3 seeds x {paper, subtle}, with --baselines."},
    )
    baselines: bool = field(
        default=False,
        metadata={
            "help": "Also train SFT on the clean rows only (the oracle filter) and on the top --filter_fractions by ref_score, where there is noise."
        },
    )
    device: str = field(default="auto", metadata={"help": "auto (a GPU when present), cpu or cuda."})
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the world (references, base) is cached (default: $POFT_CACHE/demo or ~/.cache/poft/demo)."
        },
    )
    target_rows: int = field(default=1800, metadata={"help": "Rows of the target's training split."})
    reference_rows: int = field(default=4000, metadata={"help": "Rows of the references' clean training split."})
    test_rows: int = field(default=210, metadata={"help": "Held-out prompts (30 per task family)."})
    hidden_size: int = field(default=128, metadata={"help": "Width of every model."})
    num_layers: int = field(default=2, metadata={"help": "Layers of every model."})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Learning rate of the target runs (SFT and PoFT alike)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Batch size of the target runs."})
    reference_epochs: int = field(default=6, metadata={"help": "SFT epochs of each reference on its clean split."})
    filter_fractions: list[float] = field(
        default_factory=lambda: [0.4, 0.7],
        metadata={"help": "--full: fractions kept by the ref_score filter baseline (best reported)."},
    )

    def __post_init__(self):
        if self.full:
            self.noise_rate, self.noise_kind, self.baselines = [0.0, 0.3, 0.6], ["paper", "subtle"], True
            if self.seeds == [0]:
                self.seeds = [0, 1, 2]
        if any(not 0.0 <= r < 1.0 for r in self.noise_rate):
            raise OptionError(f"--noise_rate values must be in [0, 1), got {self.noise_rate}")
        if self.epochs < 1:
            raise OptionError(f"--epochs must be at least 1, got {self.epochs}")

    def world_key(self) -> str:
        settings = [
            WORLD_VERSION,
            self.target_rows,
            self.reference_rows,
            self.test_rows,
            self.hidden_size,
            self.num_layers,
            self.reference_epochs,
        ]
        return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]


@dataclass
class World:
    train: Dataset
    test: Dataset
    references: list[str]
    base: str
    reference_accuracy: dict[str, float] = field(default_factory=dict)


def _rows(examples) -> Dataset:
    records = [e.record() for e in examples]
    for r in records:
        r["poft_id"] = conversation_id(r["messages"])
    return Dataset.from_list(records)


def _trainer_args(
    output_dir: Path, config: DemoConfig, *, epochs: int, seed: int, loss_type: str = "sft"
) -> PoFTConfig:
    return PoFTConfig(
        output_dir=str(output_dir),
        loss_type=loss_type,
        num_train_epochs=epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        max_length=128,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=50,
        report_to=[],
        seed=seed,
        use_cpu=resolve_device(config.device).type == "cpu",
        disable_tqdm=False,
    )


def build_world(config: DemoConfig) -> World:
    """Data splits, two references trained on clean data, and a pretrained target base (cached)."""
    words = make_words(80, seed=0)
    test_examples = sample_examples(config.test_rows, seed=1, words=words, unique=True)
    held_out = frozenset(e.prompt for e in test_examples)
    reference_examples = sample_examples(config.reference_rows, seed=2, words=words, exclude=held_out)
    train_examples = sample_examples(config.target_rows, seed=3, words=words, exclude=held_out)
    pretrain_examples = sample_examples(config.reference_rows, seed=4, words=words, exclude=held_out)
    world = World(train=_rows(train_examples), test=_rows(test_examples), references=[], base="")

    root = Path(config.cache_dir) if config.cache_dir else cache_root() / "demo"
    root = root / f"world-{config.world_key()}"
    paths = {"ref-char": root / "ref-char", "ref-bpe": root / "ref-bpe", "base": root / "base"}
    world.references, world.base = [str(paths["ref-char"]), str(paths["ref-bpe"])], str(paths["base"])
    if (root / "done").exists():
        logger.info("Reusing the cached references and base model in %s", root)
        world.reference_accuracy = json.loads((root / "done").read_text())["reference_accuracy"]
        return world

    texts = [t for e in reference_examples for t in (e.prompt, e.answer)]
    tokenizers = {"ref-char": char_tokenizer(alphabet()), "ref-bpe": bpe_tokenizer(texts, vocab_size=400)}
    reference_data = _rows(reference_examples)
    for index, (name, tokenizer) in enumerate(tokenizers.items()):
        logger.info(
            "Training reference %s (%s tokenizer) on %d clean rows", name, name.split("-")[1], len(reference_data)
        )
        model = tiny_llama(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers, seed=10 + index)
        trainer = PoFTTrainer(
            model,
            args=_trainer_args(root / "tmp", config, epochs=config.reference_epochs, seed=index),
            train_dataset=reference_data,
            processing_class=tokenizer,
        )
        trainer.train()
        save_model(trainer.model, tokenizer, paths[name])
        world.reference_accuracy[name], _ = exact_match_accuracy(
            trainer.model, tokenizer, world.test, max_new_tokens=24
        )
        logger.info(
            "Reference %s: %.1f%% exact match on the held-out prompts", name, 100 * world.reference_accuracy[name]
        )

    logger.info("Pretraining the target base on plain text (no chat format)")
    tokenizer = tokenizers["ref-char"]
    base = tiny_llama(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers, seed=20)
    plain = Dataset.from_dict({"text": [f"{e.prompt} {e.answer}" for e in pretrain_examples]})
    pretrain_args = SFTConfig(
        output_dir=str(root / "tmp"),
        num_train_epochs=1,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        max_length=128,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=50,
        report_to=[],
        use_cpu=resolve_device(config.device).type == "cpu",
    )
    SFTTrainer(base, args=pretrain_args, train_dataset=plain, processing_class=tokenizer).train()
    save_model(base, tokenizer, paths["base"])
    shutil.rmtree(root / "tmp", ignore_errors=True)
    (root / "done").write_text(
        json.dumps({"config": asdict(config), "reference_accuracy": world.reference_accuracy}, indent=2)
    )
    return world


class EpochEvaluator(TrainerCallback):
    """Exact match on the held-out prompts before training and after each epoch, and for PoFT the mean
    weight of clean and noisy rows."""

    def __init__(self, test: Dataset, train: Dataset, record: dict, runs: list[dict], weight_rows: int = 400):
        self.test, self.record, self.runs = test, record, runs
        # the mean weights of clean and noisy rows are estimated on a fixed sample: scoring every row each epoch
        # would cost as much as the training itself
        self.train = train.shuffle(seed=0).select(range(min(weight_rows, len(train))))

    def _evaluate(self, model, tokenizer, epoch: int) -> None:
        accuracy, _ = exact_match_accuracy(model, tokenizer, self.test, max_new_tokens=24)
        entry = {**self.record, "epoch": epoch, "accuracy": accuracy}
        if self.record["method"] != "poft":
            self.runs.append(entry)
            logger.info("%s", json.dumps(entry))
            return
        r_theta = torch.tensor(
            model_scores(model, ConversationEncoder(tokenizer, max_length=128), self.train["messages"])
        )
        weights = poft_weights(r_theta, torch.tensor(self.train["ref_score"]))
        noisy = torch.tensor(self.train[NOISE_COLUMN])
        entry["weight_clean"] = weights[~noisy].mean().item() if (~noisy).any() else None
        entry["weight_noisy"] = weights[noisy].mean().item() if noisy.any() else None
        self.runs.append(entry)
        logger.info("%s", json.dumps(entry))

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._evaluate(model, processing_class, 0)

    def on_epoch_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._evaluate(model, processing_class, round(state.epoch))


def train_target(
    world: World, data: Dataset, scored: Dataset, record: dict, config: DemoConfig, runs: list[dict]
) -> None:
    """One target run from the shared base; `data` is what it trains on, `scored` what weights are measured on."""
    loss_type = "poft" if record["method"] == "poft" else "sft"
    model = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(world.base)
    with tempfile.TemporaryDirectory() as scratch:
        args = _trainer_args(Path(scratch), config, epochs=config.epochs, seed=record["seed"], loss_type=loss_type)
        callback = EpochEvaluator(world.test, scored, record, runs)
        PoFTTrainer(model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback]).train()


def run_demo(config: DemoConfig) -> dict:
    """Build (or reuse) the world, run every (noise kind, rate, seed, method), write the report."""
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    world = build_world(config)
    runs: list[dict] = []
    separation: list[dict] = []
    distributions: dict[str, dict] = {}
    score_config = ScoreConfig(device=config.device, max_length=128, cache_dir=str(Path(world.base).parent / "scores"))
    settings = [
        (kind, rate)
        for kind in config.noise_kind
        for rate in config.noise_rate
        if rate > 0 or kind == config.noise_kind[0]
    ]
    for kind, rate in settings:
        for seed in config.seeds:
            noised = add_noise(world.train, rate, kind=kind, seed=seed)
            scored = score_dataset(noised, world.references, score_config)
            noisy = scored[NOISE_COLUMN]
            clean_scores = [s for s, n in zip(scored["ref_score"], noisy, strict=False) if not n]
            noisy_scores = [s for s, n in zip(scored["ref_score"], noisy, strict=False) if n]
            if noisy_scores:
                separation.append(
                    {"noise_kind": kind, "noise_rate": rate, "seed": seed, "auc": auc(clean_scores, noisy_scores)}
                )
                distributions.setdefault(f"{kind} {rate}", {"clean": clean_scores, "noisy": noisy_scores})
            record = {"noise_kind": kind if rate > 0 else "none", "noise_rate": rate, "seed": seed}
            methods = {"sft": scored, "poft": scored}
            if config.baselines and rate > 0:
                methods["oracle"] = scored.filter(lambda n: not n, input_columns=NOISE_COLUMN)
                for fraction in config.filter_fractions:
                    keep = max(1, math.ceil(fraction * len(scored)))
                    methods[f"filter{fraction:g}"] = scored.sort("ref_score", reverse=True).select(range(keep))
            for method, data in methods.items():
                logger.info(
                    "Training the target with %s (%s noise %.2f, seed %d)", method, record["noise_kind"], rate, seed
                )
                train_target(world, data, scored, {**record, "method": method}, config, runs)
    results = {
        "config": asdict(config),
        "reference_accuracy": world.reference_accuracy,
        "runs": runs,
        "separation": separation,
    }
    atomic_write_text(output / "results.json", json.dumps(results, indent=2))
    table = write_demo_report(results, distributions, output)
    print(table)
    return results
