"""PoFTTrainer: TRL's SFTTrainer with the PoFT objective (or the SFT baseline) and PoFT's metrics.

Conversations are tokenized and masked by `poft.chat`, the code that scored the references, so the
target's r_theta and the data's `ref_score` measure the same tokens. Each conversation's `ref_score`
travels as a per-token column, which survives TRL's padding-free collation and BFD packing unchanged;
the collator turns it back into one value per sequence, and the loss reduces the fused LM head's
per-token log-probs to per-sequence means from the sequence boundaries. The loss is normalised by the
number of sequences (objectives declared per_sequence) or of response tokens in the whole optimizer step
(all micro-batches and processes), so gradient accumulation and data parallelism give the same update as
one large batch. Around the objective, the trainer does what TRL's compute_loss does: the MoE router
load-balancing loss, the data-parallel scaling; SFT paths only TRL has (sequence parallelism,
compute_loss_func, label smoothing) are TRL's own.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from datasets import Dataset, Value
from transformers import AutoConfig
from trl import ScriptArguments, SFTConfig, SFTTrainer
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from poft.chat import ChatTemplateError, ConversationEncoder, check_reading_options, partly_truncated
from poft.errors import DataError, OptionError
from poft.logprobs import response_log_probs
from poft.models import beyond_context, model_max_length
from poft.objective_registry import DEFAULT, NAMES, POFT, POFT_TOKEN, SFT, SFT_NORM, objective_named
from poft.objective_registry import HELP as OBJECTIVE_HELP
from poft.objectives import StepTensors, calibrated_reference, poft_weights, sequence_mean_log_probs
from poft.options import apply_warmup_ratio, skip_invalid_field, system_turns_field, warmup_ratio_field
from poft.runtime import default_bf16, machine_defaults, output_dir_for, resume_checkpoint, train_and_save
from poft.schema import COMPLETION_MASK, MESSAGES, POFT_ID, REF_SCORE, entropy_column_for, is_numeric
from poft.score_settings import CUT, LENGTH_SETTINGS, SETTINGS, mismatches, scoring_settings
from poft.validation import check_model_source

logger = logging.getLogger(__name__)

REF_TOKENS = "poft_ref"  # per-token copy of the reference score, internal to the trainer
ENTROPY_TOKENS = "poft_ref_entropy"  # per-token copy of the references' entropy, for objectives that read it
PER_SEQUENCE = (REF_TOKENS, ENTROPY_TOKENS)  # per-token copies the collator turns back into one value per sequence
SEQ_IDS = "poft_seq_ids"
DEFAULT_OBJECTIVE = DEFAULT.name
# poft's former spellings of `objective` in TRL's `loss_type`
LEGACY_LOSS_TYPES = tuple(objective.name for objective in (POFT, SFT, SFT_NORM))


@dataclass
class TrainDataArguments(ScriptArguments):
    """TRL's ScriptArguments; `dataset_name` may be a local file or directory as well as a hub id."""

    skip_invalid: bool = skip_invalid_field("OUTPUT_DIR/invalid_rows.jsonl")


@dataclass
class PoFTConfig(SFTConfig):
    """SFTConfig plus PoFT's options. `objective` is poft's (see OBJECTIVE_HELP); `loss_type` stays TRL's and
    applies with `objective="sft"`, so TRL's DFT is a baseline too."""

    # None until __post_init__: whether the user chose an objective decides if a legacy loss_type contradicts it
    objective: str | None = field(
        default=None,
        metadata={"help": f"{OBJECTIVE_HELP} Unset means {DEFAULT_OBJECTIVE}.", "choices": list(NAMES)},
    )
    loss_type: str = field(
        default="nll",
        metadata={
            "help": "TRL's SFT loss, used with --objective sft: nll (cross-entropy) or dft (Dynamic Fine-Tuning). "
            "poft, sft and sft_norm are the former spellings of --objective and still accepted.",
            "choices": ["nll", "dft", "chunked_nll", *LEGACY_LOSS_TYPES],
        },
    )
    beta: float = field(
        default=1.0, metadata={"help": "Scale of the score margin in the Bradley-Terry loss (the paper uses 1)."}
    )
    gamma: float = field(default=0.0, metadata={"help": "Offset of the Bradley-Terry logit (the paper uses 0)."})
    ref_score_column: str = field(
        default=REF_SCORE, metadata={"help": "Dataset column holding the references' score r_ref."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Deprecated: use TRL's --chat_template_path (a .jinja file, or a tokenizer whose template to "
            "take). Still accepted: a .jinja file is passed there; template text serves a tokenizer without one."
        },
    )
    warmup_ratio: float | None = warmup_ratio_field()
    system_turns: str = system_turns_field()
    allow_truncation_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Train even though the reference scores were computed with another system_turns, or another "
            "max_length or truncation_mode that cuts a conversation under one of the two (a warning instead of an "
            "error): those conversations are then scored on other tokens than they are trained on."
        },
    )
    # TRL's default (checkpointing on) under transformers' current name, so that no deprecation warning is printed
    # for an option the user did not set; the old name still works and warns as transformers does.
    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Trade compute for memory by recomputing activations (default: on, as TRL)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers)."}
    )

    def __post_init__(self):
        self._chat_template_alias()
        apply_warmup_ratio(self)
        machine_defaults(self)
        if self.loss_type in LEGACY_LOSS_TYPES:
            if self.objective not in (self.loss_type, None):
                raise OptionError(
                    f"loss_type={self.loss_type!r} (poft's former spelling of the objective) contradicts "
                    f"objective={self.objective!r}. Set only --objective."
                )
            logger.warning(
                "loss_type=%r is poft's former spelling: use `objective: %s` (loss_type is TRL's nll or dft).",
                self.loss_type,
                self.loss_type,
            )
            self.objective, self.loss_type = self.loss_type, "nll"
        if self.objective is None:
            self.objective = DEFAULT_OBJECTIVE
        if self.loss_type not in ("nll", "dft", "chunked_nll"):
            raise OptionError(
                f"loss_type must be TRL's nll or dft, got {self.loss_type!r} (poft's objectives are "
                f"--objective {' | '.join(NAMES)})"
            )
        if self.objective not in NAMES:
            raise OptionError(f"objective must be one of {', '.join(NAMES)}, got {self.objective!r}")
        trl_loss = objective_named(self.objective).trl_loss
        if self.loss_type == "dft" and not trl_loss:
            raise OptionError(
                f"loss_type='dft' is TRL's SFT loss and applies with objective={SFT.name!r}, not {self.objective!r}."
            )
        if self.label_smoothing_factor and not trl_loss:
            raise OptionError(
                f"label_smoothing_factor applies with objective={SFT.name!r} only, not {self.objective!r}."
            )
        check_reading_options(self.truncation_mode, self.system_turns)
        if not self.beta > 0:  # beta 0 makes every gradient vanish; a negative beta trains towards the noise
            raise OptionError(f"--beta must be positive (the paper uses 1), got {self.beta}")
        if not math.isfinite(self.gamma):
            raise OptionError(f"--gamma must be a finite number (the paper uses 0), got {self.gamma}")
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        self.bf16 = default_bf16(self.bf16, self.fp16)
        super().__post_init__()

    def _chat_template_alias(self) -> None:
        """poft's former `chat_template` option, now TRL's `chat_template_path`: one option, one meaning."""
        if self.chat_template is not None:
            self._former_chat_template()
        path = self.chat_template_path
        if path is not None and path.endswith((".jinja", ".j2")) and not os.path.isfile(path):
            raise OptionError(f"--chat_template_path {path}: no such file. Check the path.")

    def _former_chat_template(self) -> None:
        if self.chat_template_path is not None:
            raise OptionError("--chat_template is the former name of --chat_template_path; give only the latter.")
        logger.warning("--chat_template is deprecated: use TRL's --chat_template_path (same value).")
        if os.path.isfile(self.chat_template) or self.chat_template.endswith((".jinja", ".j2")):
            self.chat_template_path, self.chat_template = self.chat_template, None


class SequenceReferences(NamedTuple):
    """What a micro-batch carries of the references, one value per sequence: their score, and their entropy where
    the objective reads it."""

    score: torch.Tensor
    entropy: torch.Tensor | None

    def compared(self) -> torch.Tensor:
        """What r_theta is compared with: the score, or the calibrated score where the entropy is carried."""
        return self.score if self.entropy is None else calibrated_reference(self.score, self.entropy)


class PoFTDataCollator:
    """TRL's language-modeling collator, plus one reference score (and entropy) per sequence and each token's
    sequence index."""

    def __init__(self, base: DataCollatorForLanguageModeling):
        self.base = base

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        carried = {key: [example.get(key) for example in examples] for key in PER_SEQUENCE}
        batch = self.base([{k: v for k, v in e.items() if k not in PER_SEQUENCE} for e in examples])
        lengths = [list(e.get("seq_lengths") or [len(e["input_ids"])]) for e in examples]
        if self.base.padding_free:
            flat = [n for per_example in lengths for n in per_example]
            seq_ids = torch.repeat_interleave(torch.arange(len(flat)), torch.tensor(flat))
            width = batch["input_ids"].size(1)
            batch[SEQ_IDS] = F.pad(seq_ids, (0, width - seq_ids.numel()), value=len(flat) - 1)[None]
        starts = [[sum(per_example[:k]) for k in range(len(per_example))] for per_example in lengths]
        for key, values in carried.items():
            if values[0] is not None:
                batch[key] = torch.tensor(
                    [value[s] for value, per_example in zip(values, starts, strict=True) for s in per_example],
                    dtype=torch.float32,
                )
        return batch


class PoFTTrainer(SFTTrainer):
    """Trains with an `objective` (PoFT, token-weighted PoFT, SFT, sft_norm) and logs PoFT's weights either way.

    The train dataset needs `messages` (see `poft.load_sft_dataset`) and, for PoFT, a finite reference
    score per row (`poft score`'s `ref_score`). Logged per step: `poft/weight` (mean
    sigmoid(-(beta (r_theta - r_ref) + gamma))), `poft/win_rate` (share of r_theta > r_ref),
    `poft/margin` (mean r_theta - r_ref), `poft/r_theta`, `poft/r_ref`.
    """

    _tag_names = ["trl", "sft", "poft"]
    loss_is_scaled_for_ga = True

    def __init__(self, model, args: PoFTConfig | None = None, *pargs, **kwargs):
        args = args or PoFTConfig(output_dir="poft-output")
        if not isinstance(args, PoFTConfig):
            raise TypeError(f"PoFTTrainer needs a PoFTConfig, got {type(args).__name__}")
        if args.packing and args.packing_strategy != "bfd":
            raise OptionError(
                f"packing_strategy={args.packing_strategy!r} cuts conversations apart, so a packed piece no longer "
                "matches its reference score. Use packing_strategy='bfd' (the default) or packing=False."
            )
        if args.assistant_only_loss or args.completion_only_loss:
            logger.info("PoFT always trains on the response tokens; assistant/completion_only_loss are implied.")
        objective = objective_named(args.objective)
        if not objective.trl_loss and kwargs.get("compute_loss_func") is not None:
            raise OptionError(f"compute_loss_func replaces the loss; it applies with objective={SFT.name!r} only.")
        args.max_length = _capped_at_context(model, args)
        # Workaround (TRL 1.16, pinned <1.17): SFTTrainer refuses max_length with padding-free batches because it
        # would not truncate them; the encoder truncates every conversation itself, so it is lifted while TRL sets up.
        self._truncate_to, self.objective = args.max_length, objective
        if args.padding_free and not args.packing:
            args.max_length = None
        try:
            super().__init__(model, args, *pargs, **kwargs)
        finally:
            args.max_length = self._truncate_to
        if not self.objective.trl_loss and _sequence_parallel(self.accelerator):
            raise OptionError(
                f"objective={self.objective.name!r} needs each conversation whole on one process; sequence "
                f"parallelism splits it. Use objective={SFT.name!r} or turn sequence parallelism off."
            )
        if not isinstance(self.data_collator, DataCollatorForLanguageModeling):
            raise ValueError("PoFTTrainer builds its own data collator; do not pass one.")
        self.data_collator = PoFTDataCollator(self.data_collator)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Trainer.train, where `resume_from_checkpoint=True` means what `poft train --resume_from_checkpoint true`
        does (`runtime.resume_checkpoint`): the last *complete* checkpoint in output_dir, or a fresh run with a
        warning. transformers takes the newest checkpoint folder, even one a kill or a full disk cut off."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = resume_checkpoint(True, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", "seq_lengths", *PER_SEQUENCE]

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"PoFTTrainer needs a datasets.Dataset for {dataset_name}, got {type(dataset).__name__}")
        if formatting_func is not None:
            raise ValueError("PoFTTrainer reads conversations from `messages`; formatting_func is not supported.")
        if MESSAGES not in dataset.column_names and args.dataset_text_field in dataset.column_names:
            if not self.objective.trl_loss:
                raise DataError(
                    f"The {dataset_name} dataset is plain text ({args.dataset_text_field!r}): no response to compare "
                    f"with the references, so objective={self.objective.name!r} cannot train on it. Use "
                    f"objective={SFT.name!r} (language modelling on the text, as TRL's SFTTrainer), or give "
                    "conversations."
                )
            return self._prepare_text(dataset, processing_class, args, packing, dataset_name)
        ref_column = args.ref_score_column
        has_ref = ref_column in dataset.column_names
        entropy = _entropy_column(ref_column) if self.objective.reads_entropy else None
        scored = self._check_conversations(dataset, ref_column, entropy, dataset_name)
        dataset = self._tokenize_conversations(dataset, args, ref_column if has_ref else None, entropy, dataset_name)
        if scored is not None:
            self._check_scoring_settings(scored, dataset, args, dataset_name)
        elif self.objective.needs_references:
            logger.warning(
                "The %s dataset's %r carries no reading settings (scores from elsewhere, or written to a file such as "
                "JSONL, which keeps the values only), so training cannot check that they read conversations as it "
                "does (max_length %s, truncation_mode %s, system_turns %s). Train on `poft score`'s output folder to "
                "have them checked.",
                dataset_name,
                ref_column,
                self._truncate_to,
                args.truncation_mode,
                args.system_turns,
            )
        dataset = self._skip_empty_responses(dataset, args, dataset_name)
        if self.objective.needs_references:
            for column in (ref_column, entropy) if entropy else (ref_column,):
                dataset = _drop_null_reference_scores(dataset, column, dataset_name)
        dataset = dataset.remove_columns(
            ["poft_num_response_tokens", "poft_truncated", "poft_row", POFT_ID]
            + ([ref_column] if has_ref else [])
            + ([entropy] if entropy else [])
        )
        if packing:
            columns = (
                ["input_ids", "labels"] + ([REF_TOKENS] if has_ref else []) + ([ENTROPY_TOKENS] if entropy else [])
            )
            dataset = dataset.select_columns(columns)
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
            dataset = pack_dataset(dataset, self._truncate_to, "bfd", {"desc": f"Packing {dataset_name} dataset"})
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _check_conversations(
        self, dataset: Dataset, ref_column: str, entropy: str | None, dataset_name: str
    ) -> dict | None:
        """Refuse, before anything is tokenized, conversations the objective cannot train on; return the settings
        the reference scores were computed with (None where the objective reads no reference). `entropy` is the
        column beside `ref_column` the objective also reads (None where it reads none)."""
        if MESSAGES not in dataset.column_names:
            raise DataError(
                f"The {dataset_name} dataset has no 'messages' column (columns: {dataset.column_names}). "
                "Load it with poft.load_sft_dataset, which accepts messages, prompt/completion, Alpaca and ShareGPT."
            )
        if self.objective.needs_references and ref_column not in dataset.column_names:
            raise DataError(
                f"The {dataset_name} dataset has no {ref_column!r} column, which PoFT needs. Score it first with "
                f"`poft score --data ... --model REF --output DIR` and train on DIR, set ref_score_column, or "
                f"use objective={SFT.name!r}."
            )
        if COMPLETION_MASK in dataset.column_names and not self.objective.trl_loss:
            raise DataError(
                f"The {dataset_name} dataset has a {COMPLETION_MASK!r} column, which leaves tokens out of the loss; "
                f"it applies with objective={SFT.name!r} only, since {self.objective.name}'s r_theta must read the "
                f"tokens its reference scores read. Drop the column or use objective={SFT.name!r}."
            )
        if not self.objective.needs_references:
            return None
        _check_reference_column(dataset, ref_column, dataset_name)
        if entropy is not None and entropy not in dataset.column_names:
            raise DataError(
                f"The {dataset_name} dataset has no {entropy!r} column, which objective={self.objective.name!r} "
                f"reads beside {ref_column!r}. Score it (again) with `poft score`, which writes both, or use "
                f"objective={POFT_TOKEN.name!r}, which reads the score alone."
            )
        if entropy is not None:
            _check_reference_column(dataset, entropy, dataset_name)
        return scoring_settings(dataset, ref_column)

    def _tokenize_conversations(
        self, dataset: Dataset, args: PoFTConfig, ref_column: str | None, entropy: str | None, dataset_name: str
    ) -> Dataset:
        """Each conversation's tokens and response-only labels by `poft.chat`, the code that scored the references,
        with its reference score copied to every token (`REF_TOKENS`) when `ref_column` is given, and the
        references' entropy (`ENTROPY_TOKENS`) when `entropy` is."""
        encoder = ConversationEncoder(
            self._tokenizer,
            fallback_template=args.chat_template,
            max_length=self._truncate_to,
            truncation_mode=args.truncation_mode,
            system_turns=args.system_turns,
        )
        if not self._tokenizer.chat_template:  # the trained model is saved with the template it learned
            self._tokenizer.chat_template = encoder.template
        return dataset.map(
            _tokenize,
            with_indices=True,
            fn_kwargs={"encoder": encoder, "ref_column": ref_column, "entropy": entropy},
            remove_columns=dataset.column_names,
            num_proc=args.dataset_num_proc,
            desc=f"Tokenizing {dataset_name} dataset (response-only labels)",
        )

    def _skip_empty_responses(self, dataset: Dataset, args: PoFTConfig, dataset_name: str) -> Dataset:
        """Warn of conversations truncation cut, and skip those it left without a response token."""
        counts = dataset["poft_num_response_tokens"]
        kept = [n for n, cut in zip(counts, dataset["poft_truncated"], strict=True) if cut and n > 0]
        if kept:
            message = partly_truncated(kept, len(counts), self._truncate_to, args.truncation_mode)
            logger.warning("The %s dataset: %s", dataset_name, message)
        empty = sum(n == 0 for n in counts)
        if not empty:
            return dataset
        logger.warning(
            "%d conversations of the %s dataset have no response token left after truncation to %s tokens "
            "and are skipped. Raise max_length to keep them.",
            empty,
            dataset_name,
            self._truncate_to,
        )
        dataset = dataset.filter(lambda n: n > 0, input_columns="poft_num_response_tokens")
        if len(dataset) == 0:
            raise DataError(
                f"None of the {empty} conversations of the {dataset_name} dataset has a response token left "
                f"after truncation to {self._truncate_to} tokens (or that this chat template marks), so there "
                "is nothing to train on. Raise max_length, or check the chat template."
            )
        return dataset

    def _prepare_text(self, dataset: Dataset, processing_class, args: PoFTConfig, packing: bool, dataset_name: str):
        """Plain text trains as TRL's SFTTrainer trains it (language modelling on `dataset_text_field`, every token,
        an eos appended, truncated to max_length); TRL's own preparation, with the max_length training uses."""
        lifted, args.max_length = args.max_length, self._truncate_to
        try:
            return super()._prepare_dataset(dataset, processing_class, args, packing, None, dataset_name)
        finally:
            args.max_length = lifted

    def _check_scoring_settings(self, scored: dict, tokenized: Dataset, args: PoFTConfig, dataset_name: str) -> None:
        """r_ref and r_theta cover the same tokens only if scoring and training read conversations alike: the same
        system turns, and the same reading length wherever either length cuts a conversation (`tokenized` says
        which ones training cuts; the scores say which ones scoring cut)."""
        training = {"max_length": self._truncate_to, **{k: getattr(args, k) for k in SETTINGS[1:]}}
        differ = mismatches(scored, training)
        if not differ:
            return
        message = (
            f"The {dataset_name} dataset's {args.ref_score_column!r} was computed with other settings than training "
            f"uses ({'; '.join(f'{n}: scored with {scored[n]!r}, training with {training[n]!r}' for n in differ)})"
        )
        fix = "Use the same values in `poft score` and `poft train`"
        if set(differ) <= set(LENGTH_SETTINGS) and CUT in scored:
            cut_scoring = set(scored[CUT])
            ids, cut_training = tokenized[POFT_ID], tokenized["poft_truncated"]
            in_scoring = sum(i in cut_scoring for i in ids)
            either = sum(i in cut_scoring or cut for i, cut in zip(ids, cut_training, strict=True))
            if not either:
                logger.info("%s; no conversation is cut under either, so both read the same tokens.", message)
                return
            message += (
                f", and {either} of {len(ids)} conversations are cut under one of them ({in_scoring} when scored, "
                f"{sum(cut_training)} in training), so they are scored on other tokens than they are trained on."
            )
            fix = " ".join(f"--{n} {scored[n]}" for n in differ)
            fix = f"Train with {fix} (as scored), or score again with the settings training uses"
        else:
            message += ", so long conversations are scored on other tokens than they are trained on."
        if not args.allow_truncation_mismatch:
            raise OptionError(f"{message} {fix}, or set allow_truncation_mismatch.")
        logger.warning("%s (allow_truncation_mismatch is set)", message)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Sequences (a per-sequence objective) or response tokens in the whole optimizer step, across processes."""
        if not batch_samples:
            return None
        if self.objective.per_sequence:
            count = sum(_num_sequences(batch) for batch in batch_samples)
        else:
            count = sum(int(batch["labels"][..., 1:].ne(-100).sum()) for batch in batch_samples)
        count = torch.tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def _forward(self, model, inputs: dict[str, Any]):
        """Response-only forward (`poft.logprobs`, the scorer's computation); returns TRL's fused-head outputs, the
        per-sequence references (None without them) and sequence ids."""
        inputs = dict(inputs)
        score, entropy = inputs.pop(REF_TOKENS, None), inputs.pop(ENTROPY_TOKENS, None)
        ref = None if score is None else SequenceReferences(score, entropy)
        seq_ids = inputs.pop(SEQ_IDS, None)
        inputs["use_cache"] = False
        if self.aux_loss_enabled:  # MoE: the model returns its load-balancing loss as outputs.aux_loss
            inputs["output_router_logits"] = True
        with self.accelerator.autocast():  # the response head sits above accelerate's mixed-precision wrapper
            outputs = response_log_probs(model, inputs, ("log_probs", "entropy", "is_top1"))
        if seq_ids is not None:
            seq_ids = seq_ids[:, 1:]  # align with the next-token log-probs
        return outputs, ref, seq_ids

    def _objective_loss(
        self, outputs, ref: SequenceReferences | None, seq_ids, num_sequences: int, num_items_in_batch
    ) -> tuple:
        """The objective's loss over this micro-batch (normalised by the step's items) and r_theta (or None)."""
        log_probs, mask = outputs.log_probs, outputs.label_mask
        r_theta, counts = None, None
        if ref is not None or not self.objective.trl_loss:  # the scores PoFT's metrics or the loss read
            r_theta, counts = sequence_mean_log_probs(log_probs, mask, seq_ids, num_sequences)
        step = StepTensors(
            log_probs,
            mask,
            r_theta,
            counts,
            None if ref is None else ref.score,
            num_items_in_batch,
            self.args.beta,
            self.args.gamma,
            dft=self.args.loss_type == "dft",
            ref_entropy=None if ref is None else ref.entropy,
        )
        return self.objective.loss_function()(step), r_theta

    def _scale_for_parallelism_and_aux(self, loss: torch.Tensor, outputs, num_items_in_batch) -> torch.Tensor:
        """What TRL's compute_loss does around its loss, for every objective: DDP averages gradients over the
        processes of a data-parallel group (tensor-parallel ranks share a batch), and an MoE model's router
        load-balancing loss, a per-micro-batch mean, is added averaged over the accumulation steps."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.objective.trl_loss and self._trl_computes_the_loss():
            inputs = {k: v for k, v in inputs.items() if k not in (*PER_SEQUENCE, SEQ_IDS)}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        outputs, ref, seq_ids = self._forward(model, inputs)
        loss, r_theta = self._objective_loss(outputs, ref, seq_ids, _num_sequences(inputs), num_items_in_batch)
        loss = self._scale_for_parallelism_and_aux(loss, outputs, num_items_in_batch)
        self._log_step_metrics(mode, inputs, outputs, r_theta, ref)
        if return_outputs:
            return loss, outputs
        return loss

    def _trl_computes_the_loss(self) -> bool:
        """SFT paths that only TRL's compute_loss has: sequence parallelism, compute_loss_func, label smoothing."""
        return (
            _sequence_parallel(self.accelerator)
            or self.compute_loss_func is not None
            or self.label_smoother is not None
        )

    def _log_step_metrics(self, mode, inputs, outputs, r_theta, ref: SequenceReferences | None) -> None:
        """TRL's token metrics plus PoFT's, summed across processes before averaging (one host sync). The weight, win
        rate and margin compare r_theta with what the objective compares it with (`SequenceReferences.compared`)."""
        mask = outputs.label_mask
        stats = [mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum()]
        if ref is not None:
            r_theta, compared = r_theta.detach(), ref.compared()
            stats += [
                poft_weights(r_theta, compared, self.args.beta, self.args.gamma).sum(),
                (r_theta > compared).sum(),
                (r_theta - compared).sum(),
                r_theta.sum(),
                ref.score.sum(),
                torch.tensor(ref.score.numel(), device=ref.score.device),
            ]
        if "attention_mask" in inputs:
            stats.append(inputs["attention_mask"].sum())
        else:
            stats.append(torch.tensor(inputs["input_ids"].numel(), device=mask.device))
        totals = self.accelerator.reduce(torch.stack([s.float() for s in stats]), reduction="sum").tolist()
        tokens, entropy, correct = totals[:3]
        metrics = self._metrics[mode]
        metrics["entropy"].append(entropy / tokens if tokens else 0.0)
        metrics["mean_token_accuracy"].append(correct / tokens if tokens else 0.0)
        if ref is not None:
            weight, wins, margin, r_theta_sum, ref_sum, n = totals[3:9]
            for key, value in zip(
                ("weight", "win_rate", "margin", "r_theta", "r_ref"),
                (weight, wins, margin, r_theta_sum, ref_sum),
                strict=False,
            ):
                metrics[f"poft/{key}"].append(value / n)
        if mode == "train":
            self._total_train_tokens += int(totals[-1]) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())


def _entropy_column(ref_column: str) -> str:
    """The entropy column an objective that reads the references' entropy takes beside `ref_column`."""
    entropy = entropy_column_for(ref_column)
    if entropy is None:
        raise OptionError(
            f"ref_score_column={ref_column!r} is not a column `poft score` writes, so there is no entropy beside it "
            f"for an objective that reads one. Use {REF_SCORE!r} or score_<name> (with entropy_<name> beside it), "
            f"or objective={POFT_TOKEN.name!r}, which reads the score alone."
        )
    return entropy


def _capped_at_context(model, args: PoFTConfig) -> int | None:
    """`args.max_length`, never past the model's context, as `poft score` reads (`models.model_max_length`): the
    positions a model never learned give noise, and learned position embeddings fail outright."""
    config = getattr(model, "config", None)
    if isinstance(model, str):
        hub = {k: v for k, v in (args.model_init_kwargs or {}).items() if k in ("revision", "trust_remote_code")}
        try:
            config = AutoConfig.from_pretrained(model, **hub)
        except (OSError, ValueError):  # TRL's own load of the model reports it
            return args.max_length
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    capped = model_max_length(args.max_length, config)
    if capped != args.max_length:
        requested = "no max_length" if args.max_length is None else f"max_length {args.max_length}"
        logger.info("%s, as poft score reads them.", beyond_context(requested, capped))
    return capped


def _sequence_parallel(accelerator) -> bool:
    config = getattr(accelerator, "parallelism_config", None)
    return bool(config is not None and getattr(config, "sp_enabled", False))


def _num_sequences(batch: dict[str, Any]) -> int:
    """Sequences in a collated batch: one per row, or per packed / padding-free segment."""
    if REF_TOKENS in batch:
        return batch[REF_TOKENS].numel()
    if SEQ_IDS in batch:
        return int(batch[SEQ_IDS].max()) + 1
    return batch["input_ids"].size(0)


def _tokenize(
    example: dict, index: int, *, encoder: ConversationEncoder, ref_column: str | None, entropy: str | None
) -> dict:
    try:
        encoded = encoder.encode(example[MESSAGES])
    except ChatTemplateError as error:
        raise ChatTemplateError(f"row {index}: {error}") from error
    out = {
        "input_ids": encoded.input_ids,
        "labels": _labels(encoded, example.get(COMPLETION_MASK), encoder, index),
        "poft_num_response_tokens": encoded.num_response_tokens,
        "poft_truncated": encoded.truncated,
        "poft_row": index,
        POFT_ID: example.get(POFT_ID) or "",
    }
    for column, tokens in ((ref_column, REF_TOKENS), (entropy, ENTROPY_TOKENS)):
        if column is not None:
            value = out[column] = example[column]
            out[tokens] = [float("nan") if value is None else float(value)] * len(encoded.input_ids)
    return out


def _labels(encoded, completion_mask: list[int] | None, encoder: ConversationEncoder, index: int) -> list[int]:
    """Response-only labels; a `completion_mask` (one 0/1 per token of the whole rendered conversation, as TRL's
    column) also sets to -100 the labels it marks 0, as TRL folds it into its labels under completion_only_loss."""
    labels = encoded.labels()
    if completion_mask is None:
        return labels
    fits = len(completion_mask) > len(labels) if encoded.truncated else len(completion_mask) == len(labels)
    if not fits:
        raise DataError(
            f"row {index}: {COMPLETION_MASK!r} has {len(completion_mask)} entries but the conversation has "
            f"{len(labels)}{' (after truncation)' if encoded.truncated else ''} tokens with this tokenizer and chat "
            "template. Compute the mask with the target's tokenizer and template (poft.chat.ConversationEncoder)."
        )
    if encoded.truncated:  # the window the encoder kept
        keep_start = encoder.truncation_mode == "keep_start"
        completion_mask = completion_mask[: len(labels)] if keep_start else completion_mask[-len(labels) :]
    return [label if keep else -100 for label, keep in zip(labels, completion_mask, strict=True)]


def _check_reference_column(dataset: Dataset, ref_column: str, dataset_name: str) -> None:
    """The reference column must hold numbers, and not only nulls, before anything is tokenized."""
    feature = dataset.features[ref_column]
    if feature == Value("null") or all(value is None for value in dataset[ref_column]):
        raise DataError(
            f"Every {ref_column!r} of the {dataset_name} dataset is null (no reference could score any row), so "
            "PoFT has nothing to compare with. Rescore with `poft score` (see its warnings), or use "
            f"objective={SFT.name!r}."
        )
    if not is_numeric(feature):
        kind = feature.dtype if isinstance(feature, Value) else type(feature).__name__
        raise DataError(
            f"The {ref_column!r} column of the {dataset_name} dataset holds {kind} values, not numbers. Give it "
            "the float scores `poft score` writes, or point ref_score_column at a numeric column."
        )


def _drop_null_reference_scores(dataset: Dataset, ref_column: str, dataset_name: str) -> Dataset:
    """Skip rows no reference could score (null); fail before training on a NaN or infinite score, naming the rows.

    `poft score` writes a null `ref_score` where a reference has no response token to score (truncated away,
    or none marked by its template): such a row has no r_ref to compare with, so it is left out, with a warning.
    A NaN or infinite score is never written by poft, so it means broken data and stops the run.
    """
    columns = zip(dataset[ref_column], dataset["poft_row"], dataset[POFT_ID], strict=True)
    bad = [(row, poft_id) for value, row, poft_id in columns if value is not None and not math.isfinite(value)]
    if bad:
        shown = ", ".join(f"row {row}" + (f" (poft_id {poft_id})" if poft_id else "") for row, poft_id in bad[:5])
        raise DataError(
            f"{len(bad)} rows of the {dataset_name} dataset have a NaN or infinite {ref_column!r}: {shown}"
            f"{' ...' if len(bad) > 5 else ''}. Rescore them with `poft score`, or drop them before training."
        )
    null = sum(value is None for value in dataset[ref_column])
    if not null:
        return dataset
    if null == len(dataset):
        raise DataError(
            f"Every {ref_column!r} of the {dataset_name} dataset left to train on is null (no reference could score "
            "any row), so PoFT has nothing to compare with. Rescore with `poft score` (see its warnings), raise "
            f"max_length, or use objective={SFT.name!r}."
        )
    logger.warning(
        "%d of %d conversations of the %s dataset have a null %r (no reference could score them: their response "
        "was truncated away, or the template marks no response token) and are skipped.",
        null,
        len(dataset),
        dataset_name,
        ref_column,
    )
    return dataset.filter(lambda value: value is not None, input_columns=ref_column)


def run_train(data_args: TrainDataArguments, training_args: PoFTConfig, model_args) -> str:
    """`poft train`: load the (scored) data, train with PoFT or SFT, save."""
    from poft.data import load_sft_dataset

    if not data_args.dataset_name or not model_args.model_name_or_path:
        raise OptionError("poft train needs --dataset_name and --model_name_or_path (in the YAML config or as flags)")
    check_model_source(model_args.model_name_or_path, "--model_name_or_path")
    with output_dir_for(training_args.output_dir, "--output_dir"):
        report = os.path.join(training_args.output_dir, "invalid_rows.jsonl") if data_args.skip_invalid else None
        train_dataset = load_sft_dataset(
            data_args.dataset_name,
            split=data_args.dataset_train_split,
            skip_invalid=data_args.skip_invalid,
            invalid_report=report,
            replace_poft_id=True,  # training writes no data, so nothing of the user's is replaced
            text_field=training_args.dataset_text_field,
        )
        eval_dataset = None
        if training_args.eval_strategy != "no":
            eval_dataset = load_sft_dataset(
                data_args.dataset_name,
                split=data_args.dataset_test_split,
                replace_poft_id=True,
                text_field=training_args.dataset_text_field,
            )
        logger.info(
            "Training %s with objective=%s on %d conversations",
            model_args.model_name_or_path,
            training_args.objective,
            len(train_dataset),
        )
        return train_and_save(PoFTTrainer, model_args, training_args, train_dataset, eval_dataset)
