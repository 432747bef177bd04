"""The demo's arms beyond the SFT-family objectives: Token Cleaning, and DPO after SFT or PoFT.

`token_cleaning` (Pang et al., ICML 2025; see `poft.token_cleaning` for the source and its defaults): the
fixed-model variant needs a reference that shares the target's tokenizer, tuned on a small high-quality set. The
world's references use other tokenizers or start from scratch, so the demo trains one from the target's base on
the references' training split (clean, or noised in the misaligned world, as PoFT's references see it), cached
inside the world's directory under its own version, so the world's key and cached models stay as they are. Each
response token's influence is its loss under the base minus its loss under that reference; the global top
`KEEP_RATIO` are kept and SFT trains on them alone, through TRL's `completion_mask` column (`PoFTTrainer` folds it
into the labels).

`<method>+dpo`: the PoFT paper's second stage. The target trains with `<method>`, then with TRL's DPOTrainer on
preference pairs whose prompts are drawn from the task suite with their own seed, never a test, validation or
target-training prompt: chosen is the correct answer, rejected the same row under the paper's noise
(`poft.noise`, a mismatched answer with character edits). Every `+dpo` arm has the same DPO budget.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft.batching import collate, pad_token_id
from poft.chat import ConversationEncoder
from poft.demo.settings import MAX_LENGTH, describe_rows, quiet, trainer_args
from poft.demo.tasks import sample_examples
from poft.dpo import PoFTDPOConfig
from poft.noise import add_noise
from poft.outputs import atomic_write_text
from poft.schema import COMPLETION_MASK, MESSAGES
from poft.token_cleaning import KEEP_RATIO, select_global_top, token_influence

logger = logging.getLogger(__name__)

TOKEN_CLEANING_REFERENCE = "token-cleaning-ref-v1"  # directory in the world's cache; bump to retrain it
DPO_PAIRS = 600
# The DPO stage's setting, chosen on the validation prompts by bench/dpo_sweep.py (bench/RESULTS.md, "DPO sweep"):
# learning rates 1e-6 to 1e-4, beta 0.05 to 0.5, 1 or 2 epochs, then an NLL term on the chosen answers. Every plain
# setting lowered validation accuracy; the smallest step with the NLL term left it as SFT had it.
DPO_EPOCHS = 1
DPO_LEARNING_RATE = 1e-6  # a thousandth of the target's 1e-3 (public recipes: a fortieth to a thousandth)
DPO_BETA = 0.05
DPO_NLL_WEIGHT = 1.0
DPO_SEED = 7  # the pairs' prompts: a seed no split of the world uses (test 1, references 2, target 3, ...)
DPO_NOISE_SEED = 8


# --------------------------------------------------------------------------- token cleaning


@torch.no_grad()
def token_log_probs(model, encoder: ConversationEncoder, conversations: list[list[dict]], batch_size: int = 64):
    """Each conversation's input ids, and each position's next-token log-prob of its label with the response mask:
    (ids per row, log-probs (rows x width), mask (rows x width)); position j scores token j from tokens < j."""
    encoded = [encoder.encode(messages) for messages in conversations]
    width = max(len(e.input_ids) for e in encoded)
    log_probs = torch.zeros(len(encoded), width, dtype=torch.float64)
    mask = torch.zeros(len(encoded), width, dtype=torch.bool)
    device = next(model.parameters()).device
    model.eval()
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        batch = collate(chunk, pad_token_id(encoder.tokenizer), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        labels = batch["labels"][:, 1:]
        scored = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        n = batch["input_ids"].size(1)
        log_probs[start : start + len(chunk), 1:n] = scored.cpu()
        mask[start : start + len(chunk), 1:n] = labels.ne(-100).cpu()
    return [e.input_ids for e in encoded], log_probs, mask


def token_cleaning_reference(world, train_args) -> str:
    """The same-tokenizer reference: the target's base after SFT on the references' split (cached in the world)."""
    from poft.trainer import PoFTTrainer

    path = Path(world.base).parent / TOKEN_CLEANING_REFERENCE
    if (path / "done").exists():
        return str(path)
    logger.info("Training Token Cleaning's reference from the base on %s", describe_rows(world.reference_data))
    model = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(world.base)
    trainer = PoFTTrainer(model, args=train_args, train_dataset=world.reference_data, processing_class=tokenizer)
    quiet(trainer, "Token Cleaning's reference")
    trainer.train()
    scratch = path.with_name(path.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    trainer.model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    shutil.rmtree(train_args.output_dir, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    scratch.rename(path)
    atomic_write_text(path / "done", json.dumps({"rows": len(world.reference_data), "from": world.base}))
    return str(path)


def token_cleaning_data(data: Dataset, base: str, reference: str, keep_ratio: float = KEEP_RATIO) -> Dataset:
    """`data` with a `completion_mask` that keeps the global top `keep_ratio` of response tokens by influence."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    encoder = ConversationEncoder(tokenizer, max_length=MAX_LENGTH)
    conversations = data[MESSAGES]
    scored = {}
    for name, path in (("base", base), ("reference", reference)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        scored[name] = token_log_probs(model, encoder, conversations)
    ids, base_lp, mask = scored["base"]
    kept = select_global_top(token_influence(base_lp, scored["reference"][1], mask), mask, keep_ratio)
    masks = [kept[row, : len(row_ids)].int().tolist() for row, row_ids in enumerate(ids)]
    logger.info(
        "Token Cleaning keeps %d of %d response tokens (%.0f%%)", int(kept.sum()), int(mask.sum()), 100 * keep_ratio
    )
    return data.add_column(COMPLETION_MASK, masks)


# --------------------------------------------------------------------------- DPO


def preference_pairs(world, count: int = DPO_PAIRS) -> Dataset:
    """Pairs on fresh prompts of the world's task suite: the correct answer chosen over its paper-noised version."""
    used = {m[0]["content"] for split in (world.train, world.validation, world.test) for m in split[MESSAGES]}
    examples = sample_examples(count, seed=DPO_SEED, words=world.words, exclude=frozenset(used), unique=True)
    rows = Dataset.from_list([e.record() for e in examples])
    noised = add_noise(rows, 1.0, kind="paper", seed=DPO_NOISE_SEED)
    pairs = [
        {"prompt": clean[:1], "chosen": clean[1:], "rejected": bad[1:]}
        for clean, bad in zip(rows[MESSAGES], noised[MESSAGES], strict=True)
        if clean != bad
    ]
    return Dataset.from_list(pairs)


@dataclass(frozen=True)
class DPOSettings:
    """The DPO stage of a `+dpo` arm: part of that arm's run identity only, so that sweeping it retrains no other
    run. `nll_weight` > 0 adds an NLL term on the chosen answers (TRL's loss_type ["sigmoid", "sft"], weighted),
    the usual remedy for DPO lowering the chosen answer's likelihood (Smaug / DPOP, arXiv 2402.13228)."""

    pairs: int = DPO_PAIRS
    learning_rate: float = DPO_LEARNING_RATE
    beta: float = DPO_BETA
    epochs: int = DPO_EPOCHS
    nll_weight: float = DPO_NLL_WEIGHT

    @property
    def name(self) -> str:
        nll = f"-nll{self.nll_weight:g}" if self.nll_weight else ""
        return f"dpo{self.pairs}-lr{self.learning_rate:g}-beta{self.beta:g}-ep{self.epochs}{nll}"


def dpo_config(output_dir: str, seed: int, batch_size: int, use_cpu: bool, settings: DPOSettings) -> PoFTDPOConfig:
    losses = (
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, settings.nll_weight]} if settings.nll_weight else {}
    )
    return trainer_args(
        PoFTDPOConfig,
        output_dir,
        epochs=settings.epochs,
        batch_size=batch_size,
        learning_rate=settings.learning_rate,
        seed=seed,
        use_cpu=use_cpu,
        beta=settings.beta,
        lr_scheduler_type="constant",
        logging_steps=10,
        **losses,
    )


def train_dpo(model, tokenizer, pairs: Dataset, args: PoFTDPOConfig):
    """DPO from `model` (its frozen copy is the reference); returns the trained model."""
    from trl import DPOTrainer

    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    quiet(trainer)
    with warnings.catch_warnings():
        # Workaround (TRL 1.16): its reference forward reads transformers' deprecated `is_gradient_checkpointing`;
        # the demo holds back that FutureWarning, about a name it does not use. Remove when TRL reads the new name.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        trainer.train()
    return trainer.model
