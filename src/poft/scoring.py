"""Score a dataset with reference models: r_m(x, y), the mean log-prob of the response tokens.

The orchestration of `poft score`: each reference reads every conversation in its own tokenizer and
chat template (`poft.chat`), its uncached rows are scored in length-sorted token-budget batches
(`poft.batching`) through TRL's fused LM head, the computation the trainer uses for r_theta, and the
results go to its cache (`poft.score_cache`), keyed by a fingerprint of the model (weights, tokenizer,
template, truncation, dtype) and by `poft_id`: a killed run resumes where it stopped, and scoring again
with one more reference computes only that one. Under `accelerate launch` the uncached rows are shared
out among the processes, each writing its own cache shard; every process then reads the merged cache,
and the main process writes the output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.utils import add_fused_lm_head

from poft.attention import VARLEN, use_varlen_by_default
from poft.batching import iter_scores, pad_token_id, uses_varlen_attention
from poft.chat import SYSTEM_TURNS, SYSTEM_TURNS_HELP, ChatTemplateError, ConversationEncoder, EncodedConversation
from poft.runtime import resolve_device, resolve_dtype
from poft.score_cache import ScoreCache, default_cache_dir, model_fingerprint

logger = logging.getLogger(__name__)

REF_SCORE = "ref_score"


class ScoringError(RuntimeError):
    """Scoring cannot go on; what was already computed stays in the cache."""


@dataclass
class ScoringOptions:
    """How a model reads and scores conversations: shared by `poft score` and `poft filter --ifd_model`."""

    # reading: template and truncation, the same rules as training
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Truncate conversations to this many tokens; use the same value for training "
            "(TRL's default is 1024)."
        },
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which end to keep when truncating: keep_start or keep_end (as in SFTConfig)."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template (.jinja file or text) for models whose tokenizer has none."},
    )
    system_turns: str = field(default="auto", metadata={"help": SYSTEM_TURNS_HELP, "choices": list(SYSTEM_TURNS)})
    # loading
    device: str = field(
        default="auto", metadata={"help": "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention implementation to load models with, e.g. sdpa, flex_attention, flash_attention_2 or "
            "poft_varlen (PyTorch's varlen flash kernel). Default: poft_varlen on CUDA GPUs that run it, else "
            "transformers' choice."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model repositories to run their own code."}
    )
    # batching and caching
    batch_tokens: int = field(
        default=16384, metadata={"help": "Token budget of one batch, padding included; batches are length-sorted."}
    )
    packing: bool | None = field(
        default=None,
        metadata={
            "help": "Pack conversations into padding-free rows (documents isolated by position ids). Default (auto): "
            "on for CUDA models whose attention skips pairs across conversations (poft_varlen, flash_attention_*, "
            "flex_attention), off otherwise: sdpa and eager keep packed rows correct but slower than padded ones."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Per-model score cache (default: $POFT_CACHE/scores or ~/.cache/poft/scores)."},
    )

    def __post_init__(self):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"--truncation_mode must be keep_start or keep_end, got {self.truncation_mode!r}")
        if self.system_turns not in SYSTEM_TURNS:
            raise ValueError(f"--system_turns must be one of {', '.join(SYSTEM_TURNS)}, got {self.system_turns!r}")
        if self.batch_tokens <= 0:
            raise ValueError(f"--batch_tokens must be positive, got {self.batch_tokens}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max_length must be at least 2, got {self.max_length}")


@dataclass
class ScoreConfig(ScoringOptions):
    """Options of `poft score`: the data, the references and the output, plus the shared scoring options."""

    data: str | None = field(
        default=None,
        metadata={"help": "SFT data: a JSONL/JSON/Parquet/CSV file, a saved dataset directory or a hub id."},
    )
    model: list[str] = field(
        default_factory=list,
        metadata={"help": "A reference model (path or hub id, optionally NAME=PATH); repeat for several references."},
    )
    output: str | None = field(
        default=None, metadata={"help": "Directory for the scored dataset (loadable with datasets.load_from_disk)."}
    )
    split: str = field(default="train", metadata={"help": "Split to read from a dataset directory or hub dataset."})
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Skip invalid data rows, writing them to OUTPUT/invalid_rows.jsonl, instead of stopping."},
    )


@dataclass(frozen=True)
class Reference:
    """A reference model: the column-safe name its scores are stored under, and where it loads from."""

    name: str
    path: str


def parse_references(specs: Sequence[str]) -> list[Reference]:
    """`PATH` or `NAME=PATH`; names default to the last path component and are made unique."""
    references, seen = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or os.sep in name:
            name, path = Path(spec.rstrip("/")).name, spec
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"
        unique, k = name, 2
        while unique in seen:
            unique, k = f"{name}_{k}", k + 1
        seen.add(unique)
        references.append(Reference(unique, path))
    return references


def load_reference_model(
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool,
    attn_implementation: str | None = None,
):
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        attn_implementation=attn_implementation,
    ).to(device)
    if attn_implementation is None and use_varlen_by_default(model, device):
        model.set_attn_implementation(VARLEN)  # packed rows through PyTorch's varlen kernel
    model.eval()
    add_fused_lm_head(model, cast_lm_head_to_fp32=True)
    return model


def score_reference(
    dataset: Dataset, reference: Reference, config: ScoringOptions
) -> tuple[list[float | None], list[int]]:
    """Scores and response-token counts of every row for one reference, through its cache."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(reference.path, trust_remote_code=config.trust_remote_code)
        model_id = model_fingerprint(reference.path)
    except (OSError, ValueError) as error:
        raise ScoringError(
            f"Cannot load reference {reference.name!r} from {reference.path!r}: {error}. Give a local model "
            "directory or a hub id that is reachable (or already in the Hugging Face cache)."
        ) from error
    encoder = ConversationEncoder(
        tokenizer,
        fallback_template=config.chat_template,
        max_length=config.max_length,
        truncation_mode=config.truncation_mode,  # type: ignore[arg-type]
        system_turns=config.system_turns,  # type: ignore[arg-type]
        name=reference.path,
    )
    meta = {
        "model": reference.path,
        "chat_template": encoder.template,
        "masking": encoder.method,  # the response rule's version: a new rule never reuses old scores
        "system_turns": config.system_turns,
        "max_length": config.max_length,
        "truncation_mode": config.truncation_mode,
        "dtype": str(dtype),
    }
    fingerprint = hashlib.sha256((model_id + json.dumps(meta, sort_keys=True)).encode()).hexdigest()[:32]
    state = PartialState(cpu=device.type == "cpu")  # on CPU, torchrun's processes join through gloo
    shard = state.process_index if state.num_processes > 1 else None
    cache = ScoreCache(Path(config.cache_dir) if config.cache_dir else default_cache_dir(), fingerprint, meta, shard)
    scored = cache.load()

    ids = dataset["poft_id"]
    pending = sorted({i for i in ids if i not in scored})
    mine = set(pending[state.process_index :: state.num_processes])  # round-robin shard of the uncached rows
    todo: dict[str, EncodedConversation] = {}
    for poft_id, messages in zip(ids, dataset["messages"], strict=True):
        if poft_id in mine and poft_id not in todo:
            try:
                todo[poft_id] = encoder.encode(messages)
            except ChatTemplateError as error:
                raise ChatTemplateError(f"conversation poft_id {poft_id}: {error}") from error
    unique = len(set(ids))
    logger.info(
        "%s: %d conversations (%d unique): %d cached in %s, %d to score (%s masking%s)",
        reference.name,
        len(ids),
        unique,
        unique - len(pending),
        cache.directory,
        len(pending),
        encoder.method,
        f"; this process scores {len(todo)}" if shard is not None else "",
    )
    unscorable = [i for i, e in todo.items() if e.num_response_tokens == 0]
    if unscorable:
        cache.append([{"poft_id": i, "score": None, "n_tokens": 0} for i in unscorable])
        for i in unscorable:
            todo.pop(i)
    if todo:
        device = state.device if shard is not None and config.device == "auto" else device
        _score_into_cache(todo, tokenizer, reference, config, device, dtype, cache)
    state.wait_for_everyone()
    scored = cache.load()
    return [scored[i][0] for i in ids], [scored[i][1] for i in ids]


def model_scores(
    model, encoder: ConversationEncoder, conversations: Sequence[Sequence[dict]], batch_tokens: int = 16384
) -> list[float | None]:
    """r_m of each conversation for an in-memory model (None where no response token survives truncation)."""
    if "forward" not in vars(model):  # TRL's fused LM head patches the instance; trainers' models already have it
        add_fused_lm_head(model)
    encoded = [encoder.encode(messages) for messages in conversations]
    scores: list[float | None] = [None] * len(encoded)
    scorable = [i for i, e in enumerate(encoded) if e.num_response_tokens > 0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for batch, means, _ in iter_scores(
        model, [encoded[i] for i in scorable], pad_token_id(encoder.tokenizer), batch_tokens, device, "Scoring"
    ):
        for i, mean in zip(batch, means, strict=True):
            scores[scorable[i]] = mean
    model.train(was_training)
    return scores


def _score_into_cache(
    todo: dict[str, EncodedConversation],
    tokenizer,
    reference: Reference,
    config: ScoringOptions,
    device: torch.device,
    dtype: torch.dtype,
    cache: ScoreCache,
) -> None:
    model = load_reference_model(reference.path, device, dtype, config.trust_remote_code, config.attn_implementation)
    packing = uses_varlen_attention(model, device) if config.packing is None else config.packing
    keys, encoded = list(todo), list(todo.values())
    for batch, means, counts in iter_scores(
        model, encoded, pad_token_id(tokenizer), config.batch_tokens, device, f"Scoring with {reference.name}", packing
    ):
        cache.append(
            [{"poft_id": keys[i], "score": m, "n_tokens": c} for i, m, c in zip(batch, means, counts, strict=True)]
        )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def score_dataset(
    dataset: Dataset, models: Sequence[str | Reference], config: ScoringOptions | None = None
) -> Dataset:
    """Add `score_<name>` and `n_tokens_<name>` per reference and their mean `ref_score` to `dataset`.

    `dataset` needs `messages` and `poft_id` (as made by `load_sft_dataset`). A row whose response is
    truncated away entirely gets null scores and is reported, never NaN.
    """
    config = config or ScoringOptions()
    if not models:
        raise ValueError("Give at least one reference model (--model PATH_OR_HUB_ID).")
    missing = {"messages", "poft_id"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"The dataset lacks {sorted(missing)}; load it with poft.load_sft_dataset first.")
    references = [m if isinstance(m, Reference) else parse_references([m])[0] for m in models]
    if len({r.name for r in references}) < len(references):
        references = parse_references([r.path for r in references])
    columns: dict[str, list] = {}
    for reference in references:
        scores, counts = score_reference(dataset, reference, config)
        columns[f"score_{reference.name}"], columns[f"n_tokens_{reference.name}"] = scores, counts
    per_row = zip(*(columns[f"score_{r.name}"] for r in references), strict=True)
    columns[REF_SCORE] = [None if None in row else sum(row) / len(row) for row in per_row]
    unscorable = sum(s is None for s in columns[REF_SCORE])
    if unscorable:
        logger.warning(
            "%d of %d conversations have no response token left after truncation to %s tokens; their scores "
            "are null and training skips them. Raise --max_length to keep them.",
            unscorable,
            len(dataset),
            config.max_length,
        )
    dataset = dataset.remove_columns([c for c in columns if c in dataset.column_names])
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    return dataset


def run_score(config: ScoreConfig) -> Dataset:
    """`poft score`: load, score with every reference, save to `config.output` with a metadata file."""
    from poft.data import load_sft_dataset

    if not config.data or not config.output:
        raise ValueError("poft score needs --data and --output.")
    if not config.model:
        raise ValueError("poft score needs at least one reference: --model PATH_OR_HUB_ID (repeat for several).")
    output = Path(config.output)
    dataset = load_sft_dataset(
        config.data,
        split=config.split,
        skip_invalid=config.skip_invalid,
        invalid_report=output / "invalid_rows.jsonl" if config.skip_invalid else None,
    )
    references = parse_references(config.model)
    scored = score_dataset(dataset, references, config)
    if not PartialState().is_main_process:
        return scored
    scored.save_to_disk(str(output))
    unscorable = [i for i, s in zip(scored["poft_id"], scored[REF_SCORE], strict=True) if s is None]
    (output / "poft_score.json").write_text(
        json.dumps(
            {
                "config": asdict(config),
                "references": [asdict(r) for r in references],
                "rows": len(scored),
                "unscorable_poft_ids": unscorable,
            },
            indent=2,
        )
    )
    filter_history = Path(config.data) / "filter_summary.json"
    if filter_history.is_file():  # provenance of an earlier `poft filter` follows the data
        shutil.copyfile(filter_history, output / "filter_summary.json")
    logger.info("Saved %d scored conversations to %s", len(scored), output)
    return scored
