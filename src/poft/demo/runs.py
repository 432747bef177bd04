"""One target run of the demo, and the store that makes a grid resumable.

A run trains the target from the shared base with one method on one (noised, scored) dataset and
records: validation accuracy and the mean weight sigmoid(r_ref - r_theta) of clean and noisy rows after
every epoch, the held-out test answers (right or wrong, per prompt, for the paired bootstrap), and the
share of optimizer steps whose gradient norm was clipped. Each finished run is one JSON file, written
atomically, so an interrupted grid resumes without redoing it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback, TrainerCallback

from poft.batching import model_scores
from poft.chat import ConversationEncoder
from poft.demo.analysis import training_options
from poft.demo.methods import dpo_config, train_dpo
from poft.demo.settings import MAX_LENGTH, trainer_args
from poft.demo.tasks import FAMILY
from poft.evaluation import exact_match_per_row
from poft.objectives import poft_weights
from poft.outputs import atomic_write_text
from poft.schema import MESSAGES, NOISE, REF_SCORE
from poft.trainer import PoFTConfig, PoFTTrainer

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 24  # the longest answer of the suite is 20 characters plus the end of turn


@dataclass(frozen=True)
class RunSpec:
    """What distinguishes one run of a grid."""

    world: str
    noise_kind: str
    noise_rate: float
    seed: int
    method: str
    learning_rate: float

    @property
    def name(self) -> str:
        return f"{self.world}-{self.noise_kind}-{self.noise_rate:g}-seed{self.seed}-{self.method}-lr{self.learning_rate:g}"


@dataclass(frozen=True)
class TrainSettings:
    """The target's training settings shared by every run of a grid (part of each run's identity)."""

    epochs: int
    batch_size: int
    lr_scheduler_type: str
    warmup_ratio: float
    max_grad_norm: float
    use_cpu: bool
    dpo_pairs: int  # of the +dpo methods

    def fingerprint(self, world_key: str) -> str:
        payload = json.dumps([world_key, asdict(self)], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


class RunStore:
    """Finished runs as one JSON file each under DIR/runs/<settings fingerprint>/."""

    def __init__(self, output: Path, fingerprint: str):
        self.directory = output / "runs" / fingerprint

    def path(self, spec: RunSpec) -> Path:
        return self.directory / f"{spec.name}.json"

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


def weight_record(model, tokenizer, sample: Dataset) -> dict:
    """PoFT's weight sigmoid(r_ref - r_theta) (beta 1, for any model) over the sample: the mean of its clean and of
    its noisy rows, and of each task family's rows (where the sample names them), to see which rows a method
    learns less."""
    r_theta = torch.tensor(
        model_scores(model, ConversationEncoder(tokenizer, max_length=MAX_LENGTH), sample[MESSAGES])
    )
    weights = poft_weights(r_theta, torch.tensor(sample[REF_SCORE]))
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

    def __init__(self, validation: Dataset, sample: Dataset, max_grad_norm: float):
        self.validation, self.sample, self.max_grad_norm = validation, sample, max_grad_norm
        self.curve: list[dict] = []
        self.grad_norms: list[float] = []

    def _record(self, model, tokenizer, epoch: int) -> None:
        correct = answers_correct(model, tokenizer, self.validation)
        self.curve.append(
            {
                "epoch": epoch,
                "validation_accuracy": sum(correct) / len(correct),
                **weight_record(model, tokenizer, self.sample),
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


def train_run(
    spec: RunSpec,
    settings: TrainSettings,
    base: str,
    data: Dataset,
    sample: Dataset,
    validation: Dataset,
    test: Dataset,
    pairs: Dataset | None = None,
) -> dict:
    """Train the target from `base` on `data` with `spec.method` (then DPO on `pairs` for a `+dpo` arm); return the
    run's record."""
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    recorder = EpochRecorder(validation, sample, settings.max_grad_norm)
    with tempfile.TemporaryDirectory() as scratch:
        args = trainer_args(
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
        trainer = PoFTTrainer(model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[recorder])
        for quiet in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(quiet)
        trainer.train()
        model = trainer.model
        if pairs is not None:
            args = dpo_config(scratch, spec.seed, settings.batch_size, settings.use_cpu)
            model = train_dpo(model, tokenizer, pairs, args)
            recorder.curve.append({**recorder.curve[-1], **_after_dpo(model, tokenizer, validation, sample)})
    test_correct = answers_correct(model, tokenizer, test)
    return {
        **asdict(spec),
        "train_rows": len(data),
        **({"dpo_pairs": len(pairs)} if pairs is not None else {}),
        "test_accuracy": sum(test_correct) / len(test_correct),
        "test_correct": test_correct,
        "curve": recorder.curve,
        "clipped_share": recorder.clipped_share(),
        "grad_norm_min": min(recorder.grad_norms, default=None),
        "grad_norm_median": sorted(recorder.grad_norms)[len(recorder.grad_norms) // 2]
        if recorder.grad_norms
        else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _after_dpo(model, tokenizer, validation: Dataset, sample: Dataset) -> dict:
    """The last curve point again after DPO (same epoch, marked), so the final validation accuracy is the model's."""
    correct = answers_correct(model, tokenizer, validation)
    return {
        "validation_accuracy": sum(correct) / len(correct),
        **weight_record(model, tokenizer, sample),
        "after_dpo": True,
    }
