"""Score a dataset with reference models: r_m(x, y), the mean log-prob of the response tokens.

Under `accelerate launch` the uncached rows are shared out among the processes, each writing its own
cache shard; every process then reads the merged cache, and the main process writes the output.

Each reference reads every conversation in its own tokenizer and chat template (`poft.chat`), and its
log-probs come from TRL's fused LM head, the same computation the trainer uses for r_theta. Batches are
length-sorted and filled up to a token budget, so nothing is padded to `max_length`. Results are
appended to a per-reference cache keyed by a fingerprint of the model (weights, tokenizer, template,
truncation, dtype) and by `poft_id`: a killed run resumes where it stopped, and scoring again with one
more reference computes only that one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
from accelerate import PartialState
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import add_fused_lm_head

from poft.chat import ConversationEncoder, EncodedConversation
from poft.objectives import sequence_mean_log_probs

logger = logging.getLogger(__name__)

REF_SCORE = "ref_score"
SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "adapter_config.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ScoringError(RuntimeError):
    """Scoring cannot go on; what was already computed stays in the cache."""


@dataclass
class ScoreConfig:
    """Options of `poft score` (and of `score_dataset`)."""

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
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Truncate conversations to this many tokens; use the same value for training (TRL's default is 1024)."
        },
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which end to keep when truncating: keep_start or keep_end (as in SFTConfig)."},
    )
    batch_tokens: int = field(
        default=16384, metadata={"help": "Token budget of one batch, padding included; batches are length-sorted."}
    )
    packing: bool | None = field(
        default=None,
        metadata={
            "help": "Pack conversations into padding-free rows (documents isolated by position ids). Default: on for CUDA models loaded with a flash-attention (varlen) implementation, off otherwise."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention implementation to load references with, e.g. sdpa or flash_attention_2 (default: transformers' choice)."
        },
    )
    device: str = field(
        default="auto", metadata={"help": "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Per-reference score cache (default: $POFT_CACHE/scores or ~/.cache/poft/scores)."},
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Chat template (.jinja file or text) for references whose tokenizer has none."}
    )
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Skip invalid data rows, writing them to OUTPUT/invalid_rows.jsonl, instead of stopping."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model repositories to run their own code."}
    )

    def __post_init__(self):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"--truncation_mode must be keep_start or keep_end, got {self.truncation_mode!r}")
        if self.batch_tokens <= 0:
            raise ValueError(f"--batch_tokens must be positive, got {self.batch_tokens}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max_length must be at least 2, got {self.max_length}")


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return dtypes[dtype]


def model_fingerprint(path: str) -> str:
    """Identify a checkpoint without reading its weights: small files by content, weight files by name, size and mtime.

    A hub id is resolved to its cached snapshot, whose directory name is the commit hash.
    """
    directory = Path(path).expanduser()
    revision = ""
    if not directory.is_dir():
        from transformers.utils.hub import cached_file

        directory = Path(cached_file(path, "config.json")).parent
        revision = directory.name
    digest = hashlib.sha256(revision.encode())
    for file in sorted(directory.iterdir()):
        if file.name in SMALL_FILES:
            digest.update(file.name.encode() + file.read_bytes())
        elif file.suffix in WEIGHT_SUFFIXES:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def cache_root() -> Path:
    """Where poft keeps what it can recompute: $POFT_CACHE, else ~/.cache/poft."""
    return Path(os.environ.get("POFT_CACHE", Path.home() / ".cache" / "poft"))


def default_cache_dir() -> Path:
    return cache_root() / "scores"


class ScoreCache:
    """Append-only JSONL of {poft_id, score, n_tokens} for one reference fingerprint.

    Each batch is appended and fsynced, so a killed run loses at most the batch in flight; a torn last
    line is cut off on reading, and duplicates collapse by `poft_id`. Under several processes each
    writes its own shard file (`shard`), and every process reads all of them; files are locked while
    read or written, so separate runs can share one cache.
    """

    def __init__(self, directory: Path, fingerprint: str, meta: dict, shard: int | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.fingerprint = directory, fingerprint
        self.path = directory / (f"{fingerprint}.jsonl" if shard is None else f"{fingerprint}.shard{shard}.jsonl")
        meta_path = directory / f"{fingerprint}.json"
        if not meta_path.exists():
            meta_path.write_text(json.dumps(meta, indent=2))

    def load(self) -> dict[str, tuple[float | None, int]]:
        entries: dict[str, tuple[float | None, int]] = {}
        for path in sorted(self.directory.glob(f"{self.fingerprint}*.jsonl")):
            with open(path, "r+b") as f, _locked(f):  # writers hold the lock, so a torn tail is a killed writer's
                text = f.read().decode("utf-8")
                if text and not text.endswith("\n"):  # that batch is scored again
                    text = text[: text.rfind("\n") + 1]
                    f.truncate(len(text.encode("utf-8")))
            for number, line in enumerate(text.splitlines(), start=1):
                try:
                    record = json.loads(line)
                    entries[record["poft_id"]] = (record["score"], record["n_tokens"])
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ScoringError(
                        f"{path}: line {number} is corrupt ({error}). Delete the file to rescore this reference."
                    ) from error
        return entries

    def append(self, records: list[dict]) -> None:
        with open(self.path, "ab") as f, _locked(f):
            f.write("".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def _locked(file) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent runs sharing a cache never interleave or cut each other's lines."""
    if fcntl is None:  # no advisory locks on this platform: one writer at a time is the user's to ensure
        yield
        return
    fcntl.flock(file.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def token_budget_batches(lengths: Sequence[int], batch_tokens: int) -> Iterator[list[int]]:
    """Indices grouped longest first so that batch size x longest length stays within `batch_tokens`.

    A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batch: list[int] = []
    for index in order:
        longest = lengths[batch[0]] if batch else lengths[index]
        if batch and (len(batch) + 1) * longest > batch_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def collate(
    encoded: Sequence[EncodedConversation], pad_token_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and response-only labels."""
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels())
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


@torch.no_grad()
def score_batch(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean response log-prob and response token count of each row, from the fused LM head."""
    outputs = model(**batch, fused_lm_head=True)
    return sequence_mean_log_probs(outputs.log_probs.float(), outputs.label_mask)


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
    model.eval()
    add_fused_lm_head(model, cast_lm_head_to_fp32=True)
    return model


def score_reference(
    dataset: Dataset, reference: Reference, config: ScoreConfig
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
        name=reference.path,
    )
    meta = {
        "model": reference.path,
        "chat_template": encoder.template,
        "masking": encoder.method,
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
            todo[poft_id] = encoder.encode(messages)
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


def packed_batches(lengths: Sequence[int], batch_tokens: int) -> Iterator[list[int]]:
    """Indices grouped longest first so that the summed length stays within `batch_tokens` (no padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batch: list[int] = []
    total = 0
    for index in order:
        if batch and total + lengths[index] > batch_tokens:
            yield batch
            batch, total = [], 0
        batch.append(index)
        total += lengths[index]
    if batch:
        yield batch


def collate_packed(encoded: Sequence[EncodedConversation], device: torch.device) -> dict[str, torch.Tensor]:
    """One padding-free row through TRL's collator: position ids restart per conversation, and the
    cumulative sequence lengths let varlen attention kernels keep the conversations apart."""
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": e.input_ids, "labels": e.labels()} for e in encoded])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def score_packed_batch(model, batch: dict[str, torch.Tensor], num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-conversation mean response log-prob and token count of a packed row."""
    seq_ids = batch["seq_idx"][:, 1:].long()  # the conversation each next-token prediction belongs to
    outputs = model(**batch, fused_lm_head=True)
    return sequence_mean_log_probs(outputs.log_probs.float(), outputs.label_mask, seq_ids, num_sequences)


def uses_varlen_attention(model, device: torch.device) -> bool:
    """Packing pays off only where attention skips the masked-out pairs: flash attention's varlen path."""
    return device.type == "cuda" and "flash" in str(getattr(model.config, "_attn_implementation", ""))


def iter_scores(
    model,
    encoded: Sequence[EncodedConversation],
    pad_token_id: int,
    batch_tokens: int,
    device: torch.device,
    desc: str,
    packing: bool = False,
) -> Iterator[tuple[list[int], list[float], list[int]]]:
    """Score `encoded` in length-sorted token-budget batches: (indices, mean log-probs, token counts) per batch.

    Padded batches by default; `packing` concatenates conversations into one padding-free row instead.
    `model` must carry TRL's fused LM head (`load_reference_model` adds it; SFT/PoFT trainers' models have it).
    """
    lengths = [len(e.input_ids) for e in encoded]
    batches = packed_batches(lengths, batch_tokens) if packing else token_budget_batches(lengths, batch_tokens)
    with tqdm(total=sum(lengths), unit="tok", unit_scale=True, desc=desc, leave=False) as bar:
        for batch in batches:
            chosen = [encoded[i] for i in batch]
            if packing:
                means, counts = score_packed_batch(model, collate_packed(chosen, device), len(batch))
            else:
                means, counts = score_batch(model, collate(chosen, pad_token_id, device))
            yield batch, means.tolist(), [int(c) for c in counts.tolist()]
            bar.update(sum(lengths[i] for i in batch))


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


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
    config: ScoreConfig,
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


def score_dataset(dataset: Dataset, models: Sequence[str | Reference], config: ScoreConfig | None = None) -> Dataset:
    """Add `score_<name>` and `n_tokens_<name>` per reference and their mean `ref_score` to `dataset`.

    `dataset` needs `messages` and `poft_id` (as made by `load_sft_dataset`). A row whose response is
    truncated away entirely gets null scores and is reported, never NaN.
    """
    config = config or ScoreConfig()
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
