"""`poft quickstart`: the whole pipeline on tiny local models in seconds, nothing downloaded.

Builds two references with different tokenizers and chat templates (one with generation markers,
one without) and a target, scores the bundled dataset with `poft score`'s code, then trains a few
PoFT steps with `PoFTTrainer`. The models are random, so the numbers only show that the machinery
runs; `poft demo` is where PoFT's effect is measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from poft.data import load_sft_dataset
from poft.demo.builders import bpe_tokenizer, char_tokenizer, save_model, tiny_llama
from poft.errors import OptionError, OutputError
from poft.options import device_field
from poft.outputs import atomic_output
from poft.schema import MARKER, MESSAGES, REF_SCORE
from poft.scoring import ScoreConfig, score_dataset
from poft.trainer import PoFTConfig, PoFTTrainer

logger = logging.getLogger(__name__)

LOGGING_STEPS = 5
MAX_LENGTH = 256  # the quickstart's max_length, in scoring and in training


@dataclass
class QuickstartConfig:
    output: str = field(
        default="poft-quickstart", metadata={"help": "Directory for the models, scores and the trained target."}
    )
    max_steps: int = field(default=20, metadata={"help": "PoFT training steps (at least 1)."})
    device: str = device_field()

    def __post_init__(self):
        if self.max_steps < 1:  # -1 would mean "train by epochs" to the Trainer; the quickstart counts steps
            raise OptionError(f"--max_steps must be at least 1 (PoFT training steps), got {self.max_steps}.")


def bundled_data_path() -> Path:
    return Path(str(resources.files("poft") / "resources" / "quickstart.jsonl"))


def check_quickstart_output(output: Path) -> None:
    """The quickstart fills its folder with models and data: only an empty folder or its own earlier output."""
    if output.is_file():
        raise OutputError(f"--output {output} is a file; give a folder for the quickstart's models and data.")
    if output.is_dir() and any(output.iterdir()) and not (output / "scored" / MARKER).is_file():
        raise OutputError(
            f"--output {output} is a non-empty folder that is not a quickstart output; give a new or empty folder."
        )


def run_quickstart(config: QuickstartConfig) -> dict:
    """Build, score, train; return where the scored data and the model are, and the last logged PoFT metrics."""
    output = Path(config.output)
    check_quickstart_output(output)
    dataset = load_sft_dataset(str(bundled_data_path()))
    texts = [m["content"] for conversation in dataset[MESSAGES] for m in conversation]
    char_tok = char_tokenizer("".join(texts))
    bpe_tok = bpe_tokenizer(texts, vocab_size=400)
    references = [
        str(save_model(tiny_llama(char_tok, seed=1), char_tok, output / "models" / "ref-chatml")),
        str(save_model(tiny_llama(bpe_tok, seed=2), bpe_tok, output / "models" / "ref-zephyr")),
    ]
    target = str(save_model(tiny_llama(char_tok, seed=3), char_tok, output / "models" / "target"))
    scored = score_dataset(
        dataset, references, ScoreConfig(device=config.device, max_length=MAX_LENGTH, cache_dir=str(output / "cache"))
    )
    with atomic_output(output / "scored", "score", [c for c in scored.column_names if c != MESSAGES]) as tmp:
        scored.save_to_disk(str(tmp))  # the quickstart's own folder: a rerun replaces it
    logger.info("Scored %d conversations; mean ref_score %.3f", len(scored), sum(scored[REF_SCORE]) / len(scored))
    args = PoFTConfig(
        output_dir=str(output / "poft-target"),
        max_steps=config.max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_length=MAX_LENGTH,
        logging_steps=min(LOGGING_STEPS, config.max_steps),  # so that a short run logs a step too
        activation_checkpointing=False,
        save_strategy="no",
        report_to=[],
    )
    trainer = PoFTTrainer(target, args=args, train_dataset=scored)
    trainer.train()
    trainer.save_model()
    last = [h for h in trainer.state.log_history if "loss" in h and "poft/weight" in h][-1]  # a step's log
    summary = {
        k: last[k] for k in ("loss", "poft/weight", "poft/win_rate", "poft/margin", "poft/r_theta", "poft/r_ref")
    }
    return {"scored": str(output / "scored"), "model": args.output_dir, "last_step": summary}
