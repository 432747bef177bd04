"""The per-reference score cache: an append-only, file-locked JSONL of scores keyed by `poft_id`.

A cache file belongs to one reference fingerprint (`model_fingerprint` plus the scoring settings), so a
killed run resumes where it stopped, a fourth reference scores only itself, and concurrent runs can
share one cache directory: a second run scoring the same reference waits for the first (`ScoreCache.exclusive`)
and scores only what it left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from poft.errors import CacheError
from poft.gguf_models import gguf_file, gguf_fingerprint
from poft.outputs import atomic_write_text, disk_error
from poft.runtime import cache_root

logger = logging.getLogger(__name__)

NULL_REASONS = ("truncated", "no_response")  # why a cached score is null: cut off by max_length, or none marked


class Entry(NamedTuple):
    """One cached row: its mean response log-prob (None: nothing to score), response-token count and the mean entropy
    of the model's next-token distribution at those positions (None where nothing was scored, or in a line written
    before poft cached entropies: `poft score` scores such a row again)."""

    score: float | None
    n_tokens: int
    null_reason: str | None = None  # one of NULL_REASONS when score is None
    truncated: bool = False  # scored on what max_length left of a longer conversation
    entropy: float | None = None

    @property
    def complete(self) -> bool:
        """Whether the entry holds all a scored row needs: a null score, or a score with its entropy."""
        return self.score is None or self.entropy is not None


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
SAMPLE_BYTES = 1 << 20  # each of the three samples of a weight file that its fingerprint reads


def model_fingerprint(path: str) -> str:
    """Identify a checkpoint by content, cheaply: small files whole, weight files by `weight_digest`.

    A copy of a model has the fingerprint of the original (so it is refused as a second reference and
    reuses its cached scores); file names and times play no part. A hub id is resolved to its cached
    snapshot, whose directory name is the commit hash; a GGUF file is known by `gguf_fingerprint`.
    """
    file = gguf_file(path)
    if file is not None:
        return gguf_fingerprint(file)
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
            digest.update(f"{file.name}:{weight_digest(file)}".encode())
    return digest.hexdigest()


def weight_digest(file: Path) -> str:
    """A weight file's size, safetensors header (every tensor's name, dtype, shape and offsets) and three
    `SAMPLE_BYTES` samples (start, middle, end): reads about 3 MiB of a 10 GB file, and tells apart
    checkpoints of one architecture, whose every tensor changes in training."""
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with file.open("rb") as f:
        if file.suffix == ".safetensors" and size >= 8:
            (header,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(min(header, size - 8)))
        for start in sorted({0, max(size - SAMPLE_BYTES, 0) // 2, max(size - SAMPLE_BYTES, 0)}):
            f.seek(start)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return cache_root() / "scores"


class ScoreCache:
    """Append-only JSONL of {poft_id, score, n_tokens, entropy[, null_reason][, truncated]} for one reference
    fingerprint.

    Each batch is appended and fsynced, so a killed run loses at most the batch in flight; a torn last
    line is cut off on reading, and duplicates collapse by `poft_id`. Under several processes each
    writes its own shard file (`shard`), and every process reads all of them; files are locked while
    read or written, so separate runs can share one cache. A line that is not poft's (not JSON, wrong
    fields or types, a NaN or infinite score) reads as missing, so that row is scored again, and one
    warning names the file and how many lines. A read-only cache is read as it is; only writing to it
    is an error.
    """

    def __init__(self, directory: Path, fingerprint: str, meta: dict, shard: int | None = None):
        if directory.exists() and not directory.is_dir():
            raise CacheError(f"--cache_dir {directory} is a file; give a folder (or leave --cache_dir out).")
        self.directory, self.fingerprint, self.shard = directory, fingerprint, shard
        self._warned: set[Path] = set()  # cache files whose corrupt lines were reported
        self.path = directory / (f"{fingerprint}.jsonl" if shard is None else f"{fingerprint}.shard{shard}.jsonl")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            meta_path = directory / f"{fingerprint}.json"
            if not meta_path.exists():
                atomic_write_text(meta_path, json.dumps(meta, indent=2))
        except OSError as error:  # a read-only cache can still serve what it holds; appending will say so
            if not directory.is_dir():
                raise CacheError(
                    f"the score cache folder {directory} cannot be created ({error.strerror or error}). Give a "
                    "writable --cache_dir, or set POFT_CACHE to a writable folder."
                ) from error
            if disk_error(error, "") is None:
                raise

    def load(self) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        for path in sorted(self.directory.glob(f"{self.fingerprint}*.jsonl")) if self.directory.is_dir() else []:
            if not path.is_file():
                raise CacheError(f"{path} is not a cache file (a folder?). Delete it to rescore this reference.")
            corrupt: list[tuple[int, str]] = []
            lines = _read_lines(path)
            for number, line in enumerate(lines, start=1):
                parsed = _parse(line)
                if isinstance(parsed, str):
                    corrupt.append((number, parsed))
                elif parsed[1].complete or parsed[0] not in entries or not entries[parsed[0]].complete:
                    entries[parsed[0]] = parsed[1]  # an older line without entropy never hides a complete one
            if corrupt and path not in self._warned:
                self._warned.add(path)
                logger.warning(
                    "%s: %d of %d lines are corrupt and ignored (first: line %d, %s); their rows are scored again.",
                    path,
                    len(corrupt),
                    len(lines),
                    *corrupt[0],
                )
        return entries

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold this cache's lock file while reading what is cached and scoring the rest: a second run scoring the
        same reference into the same cache waits here, then reads what the first wrote and scores only what it
        left. The lock goes with a killed holder's process. Not taken by the processes of one multi-process run
        (each scores its own share into its own shard), nor where the lock file cannot be made (a read-only cache,
        which scores nothing new anyway)."""
        if fcntl is None or self.shard is not None:
            yield
            return
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            f = open(lock, "a")
        except OSError:
            yield
            return
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.warning(
                    "Another run is scoring this reference into %s (it holds %s); waiting for it, then scoring only "
                    "the rows it leaves.",
                    self.directory,
                    lock.name,
                )
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def writable(self) -> bool:
        """Whether lines can be appended to this cache's file (False on a read-only cache or disk)."""
        try:
            with open(self.path, "ab"):
                return True
        except OSError:
            return False

    def append(self, records: list[dict]) -> None:
        try:
            with open(self.path, "ab") as f, _locked(f):
                f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:
            translated = disk_error(error, f"the score cache file {self.path}")
            if translated is None:
                raise
            hint = (
                " Point --cache_dir to a writable folder (scores already cached there are read fine)."
                if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
                else " Scores cached so far are kept; rerun to resume."
            )
            raise CacheError(f"{translated}{hint}") from error


def _read_lines(path: Path) -> list[bytes]:
    """Complete lines of a cache file; a torn last line (a killed writer's batch) is cut off where writable."""
    try:
        f = open(path, "r+b")
    except PermissionError:
        f = open(path, "rb")  # a read-only cache: the torn tail is only skipped
    except OSError as error:
        if error.errno != errno.EROFS:
            raise CacheError(f"{path}: cannot read this cache file ({error.strerror}).") from error
        f = open(path, "rb")
    with f, _locked(f):  # writers hold the lock, so a torn tail is a killed writer's
        data = f.read()
        if data and not data.endswith(b"\n"):  # that batch is scored again
            data = data[: data.rfind(b"\n") + 1]
            if f.writable():
                f.truncate(len(data))
    return data.splitlines()


def _parse(line: bytes) -> tuple[str, Entry] | str:
    """(poft_id, entry) of one cache line, or what is wrong with it (not JSON, wrong fields or types, a non-finite
    score: poft never writes one, so the line is not poft's)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"not JSON text: {error}"
    if not isinstance(record, dict):
        return "not a JSON object"
    poft_id, score, n_tokens = record.get("poft_id"), record.get("score", ...), record.get("n_tokens")
    number_types = (int, float)
    if not (
        isinstance(poft_id, str)
        and (score is None or isinstance(score, number_types) and not isinstance(score, bool))
        and isinstance(n_tokens, int)
        and not isinstance(n_tokens, bool)
        and n_tokens >= 0
    ):
        return (
            f"wrong fields or types: poft_id {type(poft_id).__name__}, score {type(score).__name__}, n_tokens "
            f"{type(n_tokens).__name__}"
        )
    if score is not None and not math.isfinite(score):
        return f"a non-finite score {score}"
    entropy = record.get("entropy")
    if entropy is not None and not (
        isinstance(entropy, number_types) and not isinstance(entropy, bool) and math.isfinite(entropy) and entropy >= 0
    ):
        return f"an entropy that is not a finite number >= 0: {entropy!r}"
    reason = record.get("null_reason") if score is None else None
    score = None if score is None else float(score)
    entropy = None if entropy is None or score is None else float(entropy)
    return poft_id, Entry(score, n_tokens, reason, record.get("truncated") is True, entropy)


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
