"""Checks of a model given by path, before anything is loaded: a wrong path, a folder without tokenizer files,
or missing or truncated weights each end in one line naming the folder and the fix, not in whatever
transformers happens to say (a repo-id format error for a missing path, a sentencepiece hint for
missing tokenizer files, a deserialisation error for a truncated file).

A name that is not a local path is a hub id and is checked by loading it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from poft.errors import ModelError
from poft.gguf_models import GGUF_INSTALL, gguf_file, gguf_problem, require_gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def looks_local(name: str, file_suffixes: tuple[str, ...] = ()) -> bool:
    """A path rather than a hub id (`org/name`): absolute, relative with ./ or ~, more than two parts, or a name
    ending in one of `file_suffixes`. The one rule for models and data alike."""
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or os.path.isabs(name)
        or name.count("/") > 1
        or Path(name).suffix.lower() in file_suffixes
    )


def check_model_source(
    name: str, option: str = "--model", *, safetensors_only: bool = False, gguf: bool = False
) -> None:
    """Raise `ModelError` for a local model folder that cannot load; hub ids pass (they fail at loading).

    A GGUF file (or a folder holding one, see `poft.gguf_models`) passes where `gguf` (the stage reads them through
    transformers) once the `gguf` package is there and the file is whole (`gguf_problem`), and is refused, naming the
    conversion, where not."""
    file = gguf_file(name, option)
    if file is not None:
        if gguf:
            require_gguf(file, option)
            problem = gguf_problem(file)
            if problem:
                raise ModelError(f"{option} {name}: {file.name} {problem}")
            return
        raise ModelError(
            f"{option} {name} is a GGUF file, which this command does not read (poft score and poft eval do). Convert "
            f'it to a model folder first: python -c "from poft.gguf_models import convert_gguf; '
            f"convert_gguf('{file}', 'FOLDER')\" (needs {GGUF_INSTALL})."
        )
    path = Path(name).expanduser()
    if not path.exists():
        if looks_local(name):
            raise ModelError(f"{option} {name}: no such model folder. Check the path (hub ids look like org/name).")
        return
    if not path.is_dir():
        raise ModelError(
            f"{option} {name} is a file; give the model's folder (with config.json and weights) or a .gguf file."
        )
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ModelError(
            f"{option} {name}: not a model folder (no config.json). Give the folder save_pretrained wrote."
        )
    if not any((path / file).is_file() for file in TOKENIZER_FILES):
        raise ModelError(
            f"{option} {name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}). Save the tokenizer into the "
            "model folder (tokenizer.save_pretrained(folder))."
        )
    weights = sorted(f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern))
    safetensors = [f for f in weights if f.suffix == ".safetensors"]
    if not (safetensors if safetensors_only else weights):
        kind = "*.safetensors weights" if safetensors_only else "weights (*.safetensors or *.bin)"
        raise ModelError(
            f"{option} {name} has no {kind}. Save the model there with model.save_pretrained(folder)"
            + (" (poft loads safetensors only)." if safetensors_only else ".")
        )
    for file in safetensors:
        problem = safetensors_problem(file)
        if problem:
            raise ModelError(f"{option} {name}: {file.name} is {problem}. Save or download the model again.")


def safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file cannot load (truncated, not safetensors), read from its header alone; None if fine."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"truncated ({size} bytes, the header alone says {length + 8})"
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "not a safetensors file (unreadable header)"
    if size < 8 + length + end:
        return f"truncated ({size} bytes of {8 + length + end})"
    return None
