"""Score a dataset with reference models: r_m(x, y), the mean log-prob of the response tokens.

The orchestration of `poft score`: each reference reads every conversation in its own tokenizer and
chat template (`poft.chat`), its uncached rows are scored in length-sorted token-budget batches
(`poft.batching`) through `poft.logprobs` (log-probs at the response positions only), the computation the
trainer uses for r_theta, and the results go to its cache (`poft.score_cache`), keyed by a fingerprint of
the model (weights, tokenizer, template, truncation, dtype) and by `poft_id`: a killed run resumes where it stopped, and scoring again
with one more reference computes only that one. Under `accelerate launch` the uncached rows are shared
out among the processes, each writing its own cache shard; every process then reads the merged cache,
and the main process writes the output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from accelerate import PartialState
from datasets import Dataset

from poft.batching import iter_scores, pad_token_id
from poft.chat import ChatTemplateError, ConversationEncoder, EncodedConversation, partly_truncated
from poft.errors import DataError, ModelError, OptionError, ScoringError
from poft.models import (
    ModelSpec,
    Reference,
    beyond_context,
    load_for_scoring,
    model_max_length,
    parse_references,
)
from poft.options import ModelOptions, ReadingOptions
from poft.reference_check import check_references
from poft.runtime import resolve_device
from poft.schema import (
    MESSAGES,
    POFT_ID,
    REF_ENTROPY,
    REF_SCORE,
    SCORE_PREFIXES,
    entropy_column,
    is_score_column,
    n_tokens_column,
    reference_columns,
    score_column,
    write_score_record,
)
from poft.score_cache import ScoreCache, default_cache_dir
from poft.score_settings import score_feature
from poft.stage import StageIO, open_stage

logger = logging.getLogger(__name__)

SHOWN_ROWS = 5  # rows named in an error


@dataclass
class ScoringOptions(ModelOptions, ReadingOptions):
    """How a model reads and scores conversations: shared by `poft score` and `poft filter --ifd_model`. The
    reading and model groups come first (`poft.options`), as `poft eval` shares them; batching and caching follow."""

    batch_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of one batch, padding included; batches are length-sorted and split where padding "
            "would pass 20%%. Default: 16384 on GPU (not measured yet), 2048 on CPU, measured on skewed lengths at "
            "1.28x the speed of one conversation per batch where 16384 without the bound ran at 0.52x "
            "(bench/RESULTS.md)."
        },
    )
    packing: bool | None = field(
        default=None,
        metadata={
            "help": "Pack conversations into padding-free rows (documents isolated by position ids). Default (auto): "
            "on for CUDA models whose attention skips pairs across conversations (poft_varlen, flash_attention_*, "
            "flex_attention), off otherwise: sdpa and eager keep packed rows correct but compute every pair of a row "
            "(on CPU, skewed lengths: packed 1024-token rows 1.04x and 4096-token rows 0.52x the speed of one "
            "conversation per batch, padded 2048-token batches 1.28x; bench/RESULTS.md)."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Per-model score cache (default: $POFT_CACHE/scores or ~/.cache/poft/scores)."},
    )

    def __post_init__(self):
        ReadingOptions.__post_init__(self)
        if self.batch_tokens is not None and self.batch_tokens <= 0:
            raise OptionError(f"--batch_tokens must be positive, got {self.batch_tokens}")
        if self.max_length is not None and self.max_length < 2:
            raise OptionError(f"--max_length must be at least 2, got {self.max_length}")
        ModelOptions.__post_init__(self)


@dataclass
class ScoreConfig(ScoringOptions, StageIO):
    """Options of `poft score`: the data, the references and the output, plus the shared scoring options."""

    model: list[str] = field(
        default_factory=list,
        metadata={"help": "A reference model (path or hub id, optionally NAME=PATH); repeat for several references."},
    )


def data_row(row: int) -> str:
    """How messages name a row of the user's data (1-based)."""
    return f"conversation {row} of the data"


class ReferenceScores(NamedTuple):
    """One reference's reading of a dataset: per row its score, response-token count and mean entropy, the
    max_length the rows were read with, and the poft_ids of the conversations that max_length cut."""

    scores: list[float | None]
    n_tokens: list[int]
    entropies: list[float | None]
    max_length: int | None
    cut: set[str]


@dataclass(frozen=True)
class CheckedReference:
    """A reference whose model passed its checks (`ModelSpec.check`), with its spec and content fingerprint (None
    for a hub id out of reach now: loading it says why)."""

    reference: Reference
    model: ModelSpec
    model_id: str | None


@dataclass(frozen=True)
class PreparedReference:
    """A reference ready to score, made once per run: the encoder that reads the data as it does (its tokenizer,
    at a `max_length` its context may lower), and the cache keyed by the fingerprint of the model and the reading
    settings (`cache.fingerprint`)."""

    reference: Reference
    model: ModelSpec
    encoder: ConversationEncoder
    cache: ScoreCache


def prepare_reference(checked: CheckedReference, config: ScoringOptions, shard: int | None) -> PreparedReference:
    """Load `checked`'s tokenizer and config, build its encoder and open its cache (`shard`: this process's
    cache shard under several processes)."""
    reference, model = checked.reference, checked.model
    try:
        tokenizer = model.tokenizer()
        model_config = model.config()
        model_id = checked.model_id or model.fingerprint()
    except (OSError, ValueError) as error:
        raise ModelError(
            f"Cannot load reference {reference.name!r} from {reference.path!r}: {str(error).splitlines()[0]} Give "
            "a local model directory or a hub id that is reachable (or already in the Hugging Face cache)."
        ) from error
    if model.gguf_file:
        logger.info(
            "%s: %s is a GGUF file; transformers de-quantises its weights to %s, so these are the scores of the "
            "de-quantised weights (llama.cpp computes with the quantised ones).",
            reference.name,
            reference.path,
            model.dtype,
        )
    max_length = model_max_length(config.max_length, model_config)
    encoder = ConversationEncoder(
        tokenizer,
        fallback_template=config.chat_template,
        max_length=max_length,
        truncation_mode=config.truncation_mode,  # type: ignore[arg-type]
        system_turns=config.system_turns,  # type: ignore[arg-type]
        name=reference.path,
    )
    covered = {  # what the fingerprint covers: the model's content and the settings, never how its path is spelled
        "model_fingerprint": model_id,
        "chat_template": encoder.template,
        "masking": encoder.mask_rule_version,  # the response rule's version: a new rule never reuses old scores
        "system_turns": config.system_turns,
        "max_length": max_length,
        "truncation_mode": config.truncation_mode,
        "dtype": str(model.dtype),
    }
    fingerprint = hashlib.sha256(json.dumps(covered, sort_keys=True).encode()).hexdigest()[:32]
    meta = {**covered, "first_scored_from": reference.path}  # for whoever reads the cache; not hashed
    cache = ScoreCache(Path(config.cache_dir) if config.cache_dir else default_cache_dir(), fingerprint, meta, shard)
    return PreparedReference(reference, model, encoder, cache)


def score_reference(
    dataset: Dataset, checked: CheckedReference, config: ScoringOptions, describe_row: Callable[[int], str] = data_row
) -> ReferenceScores:
    """Scores and response-token counts of every row for one reference, through its cache, the max_length they
    were read with (the model's context where `config.max_length` goes past it and a conversation reaches it), and
    the conversations it cut.

    `describe_row` names a 1-based row of `dataset` in messages (a caller scoring derived conversations,
    as IFD does, names the user's row they come from).

    Stops with `ScoringError` on a non-finite score (naming the reference and the first rows; nothing
    non-finite is cached) and when no row at all could be scored; warns, with the cause, about rows
    with a null score (cut off by truncation, or no response token marked by the template).
    """
    state = PartialState(cpu=checked.model.device.type == "cpu")  # on CPU, torchrun's processes join through gloo
    prepared = prepare_reference(checked, config, state.process_index if state.num_processes > 1 else None)
    with prepared.cache.exclusive():  # a second run sharing this cache waits, then scores only what is left
        _score_uncached(dataset, prepared, config, state, describe_row)
    state.wait_for_everyone()
    return _read_scores(dataset[POFT_ID], prepared, config, describe_row)


def _score_uncached(
    dataset: Dataset,
    prepared: PreparedReference,
    config: ScoringOptions,
    state: PartialState,
    describe_row: Callable[[int], str],
) -> None:
    """Score this process's share of the rows the cache lacks into the cache (with its lock held)."""
    reference, sharded = prepared.reference, state.num_processes > 1
    ids = dataset[POFT_ID]
    scored = prepared.cache.load()
    older = {i for i in ids if i in scored and not scored[i].complete}
    if older and not prepared.cache.writable():
        logger.warning(
            "%s: %d cached scores lack the reference's entropy (cached by an older poft) and the cache is read-only, "
            "so they are served without it: their %s is null, and objective poft_calibrated skips them. Point "
            "--cache_dir to a writable folder to compute it.",
            reference.name,
            len(older),
            REF_ENTROPY,
        )
        older = set()
    elif older:
        logger.info(
            "%s: %d cached scores lack the reference's entropy (cached by an older poft); scoring them again.",
            reference.name,
            len(older),
        )
    pending = sorted({i for i in ids if i not in scored} | older)
    mine = set(pending[state.process_index :: state.num_processes])  # round-robin shard of the uncached rows
    todo = _encode(dataset, mine, prepared, describe_row)
    _report_unknown_characters(todo, ids, reference, describe_row)
    unique = len(set(ids))
    logger.info(
        "%s: %d conversations (%d unique): %d cached in %s, %d to score (%s masking%s)",
        reference.name,
        len(ids),
        unique,
        unique - len(pending),
        prepared.cache.directory,
        len(pending),
        prepared.encoder.mask_rule_version,
        f"; this process scores {len(todo)}" if sharded else "",
    )
    unscorable = [i for i, e in todo.items() if e.num_response_tokens == 0]
    if unscorable:
        prepared.cache.append(
            [
                {
                    "poft_id": i,
                    "score": None,
                    "n_tokens": 0,
                    "null_reason": "truncated" if todo[i].truncated else "no_response",
                }
                for i in unscorable
            ]
        )
        for i in unscorable:
            todo.pop(i)
    if todo:
        model = replace(prepared.model, device=state.device) if sharded and config.device == "auto" else prepared.model
        rows: dict[str, int] = {}
        for row, poft_id in enumerate(ids, start=1):
            rows.setdefault(poft_id, row)
        _score_into_cache(todo, rows, prepared, model, config, describe_row)


def _encode(
    dataset: Dataset, mine: set[str], prepared: PreparedReference, describe_row: Callable[[int], str]
) -> dict[str, EncodedConversation]:
    """The conversations of `mine` as `prepared` reads them, each once; a template error names its row."""
    todo: dict[str, EncodedConversation] = {}
    for row, (poft_id, messages) in enumerate(zip(dataset[POFT_ID], dataset[MESSAGES], strict=True), start=1):
        if poft_id in mine and poft_id not in todo:
            try:
                todo[poft_id] = prepared.encoder.encode(messages)
            except ChatTemplateError as error:
                raise ChatTemplateError(
                    f"reference {prepared.reference.name!r}, {describe_row(row)}, poft_id {poft_id}: {error}"
                ) from error
    return todo


def _read_scores(
    ids: Sequence[str], prepared: PreparedReference, config: ScoringOptions, describe_row: Callable[[int], str]
) -> ReferenceScores:
    """Every row's entry from the merged cache, with the warnings about null, truncated and capped readings."""
    reference, max_length = prepared.reference, prepared.encoder.max_length
    scored = prepared.cache.load()
    entries = [scored[i] for i in ids]
    _report_null_scores(entries, ids, reference, max_length, describe_row, prepared.encoder.template_fix)
    kept = [e.n_tokens for e in entries if e.score is not None and e.truncated]
    if kept:
        message = partly_truncated(kept, len(ids), max_length, config.truncation_mode)
        logger.warning("reference %r: %s", reference.name, message)
    capped = max_length != config.max_length and any(e.truncated or e.null_reason == "truncated" for e in entries)
    if capped:
        requested = "no --max_length" if config.max_length is None else f"--max_length {config.max_length}"
        logger.warning(
            "reference %r: %s, as its scores record.", reference.name, beyond_context(requested, max_length)
        )
    # where no conversation reaches the context, the scores are those the requested max_length gives
    cut = {i for i, e in zip(ids, entries, strict=True) if e.truncated or e.null_reason == "truncated"}
    return ReferenceScores(
        [e.score for e in entries],
        [e.n_tokens for e in entries],
        [e.entropy for e in entries],
        max_length if capped else config.max_length,
        cut,
    )


def _report_unknown_characters(
    todo: dict[str, EncodedConversation], ids: Sequence[str], reference: Reference, describe_row: Callable[[int], str]
) -> None:
    """Say which response characters the reference's tokenizer reads as its unknown token, and in which rows."""
    rows = [row for row, poft_id in enumerate(ids, start=1) if poft_id in todo and todo[poft_id].unknown]
    if not rows:
        return
    pieces = list(dict.fromkeys(piece for row in rows for piece in todo[ids[row - 1]].unknown))
    named = [f"{p!r} (U+{ord(p):04X})" if len(p) == 1 else repr(p) for p in pieces[:SHOWN_ROWS]]
    logger.warning(
        "reference %r: %d conversations have response text its tokenizer reads as its unknown token: %s (first: %s). "
        "This is the tokenizer's vocabulary, not the chat template: replace them in the data, or use a reference "
        "whose tokenizer knows them.",
        reference.name,
        len(rows),
        ", ".join(named) + (" ..." if len(pieces) > SHOWN_ROWS else ""),
        describe_row(rows[0]),
    )


def _report_null_scores(
    entries,
    ids: Sequence[str],
    reference: Reference,
    max_length: int | None,
    describe_row: Callable[[int], str],
    template_fix: str,
) -> None:
    """Say why rows have no score (truncation, or a template that marks no response token); none scored stops."""
    null = [(row, e.null_reason) for row, e in enumerate(entries, start=1) if e.score is None]
    if not null:
        return
    no_response = [row for row, reason in null if reason == "no_response"]
    truncated = len(null) - len(no_response)
    causes = []
    if no_response:
        causes.append(
            f"{len(no_response)} have no response token in this reference's chat template (first: "
            f"{describe_row(no_response[0])}); the template may drop assistant content: {template_fix.rstrip('.')}"
        )
    if truncated:
        causes.append(
            f"{truncated} have no response token left after truncation to {max_length} tokens; raise "
            "--max_length to keep them"
        )
    message = f"reference {reference.name!r}: {len(null)} of {len(ids)} conversations have a null score: " + "; ".join(
        causes
    )
    if len(null) == len(ids):
        raise ScoringError(f"{message}. No row could be scored, so this reference cannot be used.")
    logger.warning("%s. `poft train` skips rows with a null ref_score.", message)


def _score_into_cache(
    todo: dict[str, EncodedConversation],
    rows: dict[str, int],
    prepared: PreparedReference,
    spec: ModelSpec,
    config: ScoringOptions,
    describe_row: Callable[[int], str],
) -> None:
    """Load the model of `spec` and append the scores of `todo` to the cache, batch by batch."""
    reference, cache, device = prepared.reference, prepared.cache, spec.device
    model, packing = load_for_scoring(spec, config.packing)
    keys, encoded = list(todo), list(todo.values())
    for batch, means, counts, entropies in iter_scores(
        model,
        encoded,
        pad_token_id(prepared.encoder.tokenizer),
        config.batch_tokens,
        device,
        f"Scoring with {reference.name}",
        packing,
        entropy=True,
    ):
        finite = [k for k, (m, h) in enumerate(zip(means, entropies, strict=True)) if math.isfinite(m + h)]
        cache.append(
            [
                {"poft_id": keys[batch[k]], "score": means[k], "n_tokens": counts[k], "entropy": entropies[k]}
                | ({"truncated": True} if encoded[batch[k]].truncated else {})
                for k in finite
            ]
        )
        if len(finite) < len(batch):
            bad = sorted(rows[keys[batch[k]]] for k in range(len(batch)) if k not in finite)
            what = "log-probs" if not all(math.isfinite(m) for m in means) else "entropies"
            raise ScoringError(
                f"reference {reference.name!r} ({reference.path}) gives non-finite {what} (NaN or inf) for "
                f"{', '.join(map(describe_row, bad[:SHOWN_ROWS]))}{' ...' if len(bad) > SHOWN_ROWS else ''}; "
                "nothing non-finite was cached or written. Check the model's weights (NaN weights, an overflow in "
                "--dtype float16: try --dtype float32)."
            )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def score_dataset(
    dataset: Dataset,
    models: Sequence[str | Reference],
    config: ScoringOptions | None = None,
    describe_row: Callable[[int], str] = data_row,
) -> Dataset:
    """Add `score_<name>`, `n_tokens_<name>` and `entropy_<name>` per reference, their mean score `ref_score` and their
    mean entropy `ref_entropy` to `dataset`.

    `dataset` needs `messages` and `poft_id` (as made by `load_sft_dataset`). `ref_score` is the mean of
    exactly these references; the same model given twice is refused. A row whose response is truncated
    away entirely (or that the template marks no response in) gets null scores and is reported, never NaN.
    The score columns carry the truncation settings (`poft.score_settings`), which `PoFTTrainer` checks.
    """
    config = config or ScoringOptions()
    if not models:
        raise OptionError("Give at least one reference model (--model PATH_OR_HUB_ID).")
    missing = {MESSAGES, POFT_ID} - set(dataset.column_names)
    if missing:
        raise DataError(f"The dataset lacks {sorted(missing)}; load it with poft.load_sft_dataset first.")
    references = [m if isinstance(m, Reference) else parse_references([m])[0] for m in models]
    if len({r.name for r in references}) < len(references):
        references = parse_references([r.path for r in references])
    return _add_scores(dataset, _check_references(references, config), config, describe_row)


def _add_scores(
    dataset: Dataset, checked: Sequence[CheckedReference], config: ScoringOptions, describe_row: Callable[[int], str]
) -> Dataset:
    """`score_dataset` for references already checked: their columns and ref_score, with their settings."""
    columns: dict[str, list] = {}
    read_to: dict[str, int | None] = {}  # each score column's max_length: the model's context may lower it
    cut: dict[str, set[str]] = {}  # each score column's conversations that max_length cut
    for ref in checked:
        read = score_reference(dataset, ref, config, describe_row)
        name = ref.reference.name
        columns[score_column(name)], columns[n_tokens_column(name)] = read.scores, read.n_tokens
        columns[entropy_column(name)] = read.entropies
        for column in (score_column(name), entropy_column(name)):
            read_to[column], cut[column] = read.max_length, read.cut
    shortest = min(read_to.values(), key=lambda n: math.inf if n is None else n)  # the means' reading
    every_cut = set().union(*cut.values())
    for mean, column_of in ((REF_SCORE, score_column), (REF_ENTROPY, entropy_column)):
        per_row = zip(*(columns[column_of(r.reference.name)] for r in checked), strict=True)
        columns[mean] = [None if None in row else sum(row) / len(row) for row in per_row]
        read_to[mean], cut[mean] = shortest, every_cut
    dataset = dataset.remove_columns([c for c in columns if c in dataset.column_names])
    for name, values in columns.items():
        # the trainer checks that it truncates as these scores were computed
        settings = SimpleNamespace(
            max_length=read_to.get(name), truncation_mode=config.truncation_mode, system_turns=config.system_turns
        )
        feature = None if name.startswith("n_tokens_") else score_feature(settings, cut[name])
        dataset = dataset.add_column(name, values, feature=feature)
    return dataset


def _check_references(references: Sequence[Reference], options: ModelOptions) -> list[CheckedReference]:
    """Each reference a loadable-looking model (`ModelSpec.check`), and none twice: the same model (one
    fingerprint) would count twice in ref_score."""
    checked: list[CheckedReference] = []
    seen: dict[str, Reference] = {}
    for reference in references:
        model = ModelSpec.of(reference.path, options)
        model.check()
        try:
            model_id = model.fingerprint()
        except OSError:  # an unreachable hub id: loading it says so
            model_id = None
        key = model_id or reference.path
        if key in seen:
            raise OptionError(
                f"--model {reference.path} is the same model as --model {seen[key].path} (same fingerprint: the "
                "same config, tokenizer and weight files), so it would count twice in ref_score. Give each "
                "reference once."
            )
        seen[key] = reference
        checked.append(CheckedReference(reference, model, model_id))
    return checked


def run_score(config: ScoreConfig) -> Dataset:
    """`poft score`: score every row with every reference; save to `config.output` with its record, atomically.

    The output is refused, before anything is scored, where it would replace the input or another
    output (see `poft.stage`). Score columns poft wrote for references not named in this run are
    dropped (they are not part of the new ref_score); score columns poft did not write are kept as
    they are.
    """
    stage = open_stage(config, "score")
    if not config.model:
        raise OptionError("poft score needs at least one reference: --model PATH_OR_HUB_ID (repeat for several).")
    references = parse_references(config.model)
    checked = _check_references(references, config)  # before the data is read, so a typo fails in a second
    device = resolve_device(config.device)
    state = PartialState(cpu=device.type == "cpu")
    new = reference_columns(r.name for r in references)

    def kept_columns(column_names: list[str]) -> list[str]:
        return [c for c in column_names if c not in new and c not in stage.inherited and c.startswith(SCORE_PREFIXES)]

    def score(dataset: Dataset) -> Dataset:
        if kept := kept_columns(dataset.column_names):
            logger.info("Kept %s as they are: columns poft did not write, not part of %s.", ", ".join(kept), REF_SCORE)
        scored = _add_scores(dataset, checked, config, data_row)
        columns = {c: scored[c] for c in scored.column_names if is_score_column(c)}
        if (check := check_references(columns)) is not None:
            (logger.warning if check.weak else logger.info)("%s", check.line())
        return scored

    def record(directory: Path, scored: Dataset, dropped: list[str]) -> None:
        unscorable = [i for i, s in zip(scored[POFT_ID], scored[REF_SCORE], strict=True) if s is None]
        write_score_record(
            directory,
            {
                "config": asdict(config),
                "references": [asdict(r) for r in references],
                "rows": len(scored),
                "dropped_columns": dropped,
                "kept_columns": kept_columns(scored.column_names),
                "unscorable_poft_ids": unscorable,
            },
        )

    return stage.write(
        new,
        score,
        stale=lambda c: c.startswith(SCORE_PREFIXES),
        stale_reason=f"scores of references not named in this run, which are not part of the new {REF_SCORE}.",
        record=record,
        main_process=state.is_main_process,
    )
