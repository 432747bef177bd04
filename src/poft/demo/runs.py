"""One target run of the demo, and the store that makes a grid resumable.

A run trains the target from the shared base with one method on one (noised, scored) dataset and
records: validation accuracy and the mean weight sigmoid(r_ref - r_theta) of clean and noisy rows (and of each
task family) after every epoch, the held-out test answers (right or wrong, per prompt, for the paired bootstrap),
and the share of optimizer steps whose gradient norm was clipped. A `+dpo` arm then runs DPO from its base
method's finished model and records how the chosen and rejected answers' log-probs moved. Each finished run is one
JSON file, written atomically, under a directory keyed by the settings and the code that trained it, so an
interrupted grid resumes without redoing a run and a run of older code is never reported as this code's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import poft
from poft.batching import model_scores
from poft.chat import ConversationEncoder
from poft.demo.analysis import base_method, training_options
from poft.demo.methods import DPOSettings, dpo_config, train_dpo
from poft.demo.settings import MAX_LENGTH, quiet, trainer_args
from poft.demo.tasks import FAMILY
from poft.evaluation import exact_match_per_row
from poft.objective_registry import objective_named
from poft.objectives import calibrated_reference, poft_weights
from poft.outputs import atomic_output, atomic_write_text
from poft.schema import MESSAGES, NOISE, REF_ENTROPY, REF_SCORE
from poft.trainer import PoFTConfig, PoFTTrainer

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 24  # the longest answer of the suite is 20 characters plus the end of turn
# poft's modules that only present results: a change to them leaves every run's numbers as they were
PRESENTATION = ("cli.py", "report.py", "report_html.py", "audit.py", "demo/report.py", "demo/intervals.py")


@functools.cache
def code_version() -> str:
    """poft's version and a hash of its source that trains and evaluates (every module but `PRESENTATION`): part of
    a run's key, so that a run finished by other code is trained again rather than reported as this code's."""
    root = Path(poft.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        if name not in PRESENTATION:
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return f"{poft.__version__}+{digest.hexdigest()[:10]}"


@dataclass(frozen=True)
class RunSpec:
    """What distinguishes one run of a grid; `dpo` is the DPO stage of a `+dpo` arm (None for every other)."""

    world: str
    noise_kind: str
    noise_rate: float
    seed: int
    method: str
    learning_rate: float
    dpo: DPOSettings | None = None

    @property
    def name(self) -> str:
        name = f"{self.world}-{self.noise_kind}-{self.noise_rate:g}-seed{self.seed}-{self.method}-lr{self.learning_rate:g}"
        return f"{name}-{self.dpo.name}" if self.dpo else name

    def first_stage(self) -> RunSpec:
        """The run of a `+dpo` arm's base method, whose finished model its DPO stage starts from."""
        return RunSpec(
            self.world, self.noise_kind, self.noise_rate, self.seed, base_method(self.method), self.learning_rate
        )


@dataclass(frozen=True)
class TrainSettings:
    """The target's training settings shared by every run of a grid (part of each run's identity)."""

    epochs: int
    batch_size: int
    lr_scheduler_type: str
    warmup_ratio: float
    max_grad_norm: float
    use_cpu: bool

    def fingerprint(self, world_key: str) -> str:
        """The key of a grid's runs: the world, these settings and the code (`code_version`)."""
        payload = json.dumps([world_key, asdict(self), code_version()], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


class RunStore:
    """Finished runs as one JSON file each under DIR/runs/<fingerprint>/, and the final models of the runs a `+dpo`
    arm starts from under DIR/runs/<fingerprint>/models/."""

    def __init__(self, output: Path, fingerprint: str):
        self.directory = output / "runs" / fingerprint

    def path(self, spec: RunSpec) -> Path:
        return self.directory / f"{spec.name}.json"

    def model_path(self, spec: RunSpec) -> Path:
        return self.directory / "models" / spec.name

    def load(self, spec: RunSpec) -> dict | None:
        path = self.path(spec)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; the run is done again.", path)
            return None

    def save(self, spec: RunSpec, record: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(spec), json.dumps(record, indent=1))


def answers_correct(model, tokenizer, dataset: Dataset, batch_size: int = 128) -> list[int]:
    """1 where the greedy answer to a row's prompt is exactly its `answer`, else 0."""
    correct, _ = exact_match_per_row(model, tokenizer, dataset, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size)
    return [int(c) for c in correct]


def weight_record(model, tokenizer, sample: Dataset, calibrated: bool = False) -> dict:
    """PoFT's weight sigmoid(r_ref - r_theta) (beta 1, for any model; against r_ref + H_ref where `calibrated`, as
    poft_calibrated compares) over the sample: the mean of its clean and of its noisy rows, and of each task
    family's rows (where the sample names them), to see which rows a method learns less."""
    r_theta = torch.tensor(
        model_scores(model, ConversationEncoder(tokenizer, max_length=MAX_LENGTH), sample[MESSAGES])
    )
    reference = torch.tensor(sample[REF_SCORE])
    if calibrated:
        reference = calibrated_reference(reference, torch.tensor(sample[REF_ENTROPY]))
    weights = poft_weights(r_theta, reference)
    noisy = torch.tensor(sample[NOISE])
    record = {
        "weight_clean": weights[~noisy].mean().item() if (~noisy).any() else None,
        "weight_noisy": weights[noisy].mean().item() if noisy.any() else None,
    }
    if FAMILY in sample.column_names:
        families = sample[FAMILY]
        record["weight_by_family"] = {
            family: weights[torch.tensor([f == family for f in families])].mean().item()
            for family in sorted(set(families))
        }
    return record


class EpochRecorder(TrainerCallback):
    """Validation accuracy and clean / noisy weights before training and after each epoch; the gradient norms."""

    def __init__(self, validation: Dataset, sample: Dataset, max_grad_norm: float, calibrated: bool = False):
        self.validation, self.sample, self.max_grad_norm, self.calibrated = (
            validation,
            sample,
            max_grad_norm,
            calibrated,
        )
        self.curve: list[dict] = []
        self.grad_norms: list[float] = []

    def _record(self, model, tokenizer, epoch: int) -> None:
        correct = answers_correct(model, tokenizer, self.validation)
        self.curve.append(
            {
                "epoch": epoch,
                "validation_accuracy": sum(correct) / len(correct),
                **weight_record(model, tokenizer, self.sample, self.calibrated),
            }
        )

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._record(model, processing_class, 0)

    def on_epoch_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._record(model, processing_class, round(state.epoch))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "grad_norm" in logs:
            self.grad_norms.append(float(logs["grad_norm"]))

    def clipped_share(self) -> float | None:
        """Share of optimizer steps whose pre-clipping gradient norm exceeded max_grad_norm."""
        if not self.grad_norms or self.max_grad_norm <= 0:
            return None
        return sum(n > self.max_grad_norm for n in self.grad_norms) / len(self.grad_norms)


def _train_args(spec: RunSpec, settings: TrainSettings, scratch: str) -> PoFTConfig:
    return trainer_args(
        PoFTConfig,
        scratch,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        use_cpu=settings.use_cpu,
        **training_options(spec.method),
        lr_scheduler_type=settings.lr_scheduler_type,
        # transformers 5 has no warmup_ratio: a float below 1 in warmup_steps is that share of the steps
        warmup_steps=settings.warmup_ratio,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=1,  # every step's pre-clipping gradient norm reaches the recorder
    )


def train_run(
    spec: RunSpec,
    settings: TrainSettings,
    base: str,
    data: Dataset,
    sample: Dataset,
    validation: Dataset,
    test: Dataset,
    save_to: Path | None = None,
) -> dict:
    """Train the target from `base` on `data` with `spec.method` (not a `+dpo` arm); return the run's record, and save
    the trained model to `save_to` where a `+dpo` arm will start from it."""
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    calibrated = objective_named(training_options(spec.method)["objective"]).reads_entropy
    recorder = EpochRecorder(validation, sample, settings.max_grad_norm, calibrated)
    with tempfile.TemporaryDirectory() as scratch:
        args = _train_args(spec, settings, scratch)
        trainer = PoFTTrainer(model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[recorder])
        quiet(trainer)
        trainer.train()
        model = trainer.model
    record = {**asdict(spec), **tested(model, tokenizer, test)}
    if save_to is not None:  # after the test, so that a saved model's run has always been evaluated
        save_model_atomically(model, tokenizer, save_to)
    return {
        **record,
        "train_rows": len(data),
        "curve": recorder.curve,
        "clipped_share": recorder.clipped_share(),
        "grad_norm_min": min(recorder.grad_norms, default=None),
        "grad_norm_median": sorted(recorder.grad_norms)[len(recorder.grad_norms) // 2]
        if recorder.grad_norms
        else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def tested(model, tokenizer, test: Dataset) -> dict:
    """What every run records of its final model: the test answers, right or wrong, their share, and the code."""
    correct = answers_correct(model, tokenizer, test)
    return {"test_accuracy": sum(correct) / len(correct), "test_correct": correct, "code": code_version()}


def save_model_atomically(model, tokenizer, path: Path) -> None:
    """The model and tokenizer written whole into `path` (`poft.outputs.atomic_output`): a kill leaves the old
    folder or the new one, and a folder of an earlier run is replaced."""
    with atomic_output(path, "demo model") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def dpo_run(
    spec: RunSpec,
    settings: TrainSettings,
    first_stage: Path,
    first_record: dict,
    pairs: Dataset,
    sample: Dataset,
    validation: Dataset,
    test: Dataset,
) -> dict:
    """A `+dpo` arm: DPO (`spec.dpo`) on `pairs` from the finished model of its first stage (`first_record`'s run);
    its record is the first stage's, with the point after DPO added to the curve, its test answers, and the mean
    per-token log-prob of the pairs' chosen and rejected answers and of the validation answers before and after."""
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(first_stage, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(first_stage)
    before = answer_log_probs(model, tokenizer, pairs, validation)
    with tempfile.TemporaryDirectory() as scratch:
        model = train_dpo(
            model, tokenizer, pairs, dpo_config(scratch, spec.seed, settings.batch_size, settings.use_cpu, spec.dpo)
        )
    after = answer_log_probs(model, tokenizer, pairs, validation)
    return {
        **first_record,
        **asdict(spec),
        **tested(model, tokenizer, test),
        "dpo_pairs": len(pairs),
        "curve": [
            *first_record["curve"],
            {**first_record["curve"][-1], **_after_dpo(model, tokenizer, validation, sample)},
        ],
        "log_probs": {
            f"{key} {when}": value
            for when, values in (("before", before), ("after", after))
            for key, value in values.items()
        },
        "seconds": round(first_record["seconds"] + time.perf_counter() - started, 1),
    }


def answer_log_probs(model, tokenizer, pairs: Dataset, validation: Dataset) -> dict[str, float]:
    """Mean per-token log-prob (r) of the pairs' chosen and rejected answers and of the validation rows' answers."""
    encoder = ConversationEncoder(tokenizer, max_length=MAX_LENGTH)
    conversations = {
        "chosen": [p + c for p, c in zip(pairs["prompt"], pairs["chosen"], strict=True)],
        "rejected": [p + r for p, r in zip(pairs["prompt"], pairs["rejected"], strict=True)],
        "validation answers": validation[MESSAGES],
    }
    means = {}
    for key, rows in conversations.items():
        scores = [s for s in model_scores(model, encoder, rows) if s is not None]
        means[key] = sum(scores) / len(scores)
    return means


def _after_dpo(model, tokenizer, validation: Dataset, sample: Dataset) -> dict:
    """The last curve point again after DPO (same epoch, marked), so the final validation accuracy is the model's."""
    correct = answers_correct(model, tokenizer, validation)
    return {
        "validation_accuracy": sum(correct) / len(correct),
        **weight_record(model, tokenizer, sample),
        "after_dpo": True,
    }
