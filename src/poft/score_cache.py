"""The per-reference score cache: an append-only, file-locked JSONL of scores keyed by `poft_id`.

A cache file belongs to one reference fingerprint (`model_fingerprint` plus the scoring settings), so a
killed run resumes where it stopped, a fourth reference scores only itself, and concurrent runs can
share one cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from poft.runtime import cache_root


class CacheError(RuntimeError):
    """A score cache file cannot be read; deleting it rescores that reference."""


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
                    raise CacheError(
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
