"""GGUF models (llama.cpp's format) as references: where one is, how transformers loads it, what identifies it.

transformers reads a GGUF file through the `gguf` package (the optional extra `poft[gguf]`) and
de-quantises its weights, so scores computed here are those of the de-quantised weights, not of
llama.cpp's quantised arithmetic. A reference is named by the file itself or by a folder holding
exactly one `.gguf` and no `config.json`.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import struct
from functools import lru_cache
from pathlib import Path

from poft.errors import DependencyError, ModelError, OutputError

GGUF_INSTALL = "pip install 'poft[gguf]'"
SAMPLE_BYTES = 1 << 20  # each of the three samples of the tensor data that a GGUF fingerprint reads


def gguf_file(name: str, option: str = "--model") -> Path | None:
    """The GGUF file `name` names (the file, or the only `.gguf` of a folder without config.json); None otherwise."""
    path = Path(name).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        raise ModelError(
            f"{option} {name} holds {len(files)} GGUF files ({', '.join(f.name for f in files[:4])}"
            f"{' ...' if len(files) > 4 else ''}); name the one to use, e.g. {option} {files[0]}."
        )
    return files[0] if files else None


def require_gguf(file: Path, option: str = "--model") -> None:
    """A `DependencyError` naming the extra where the `gguf` package (>= transformers' minimum) is missing."""
    from transformers.utils.import_utils import GGUF_MIN_VERSION, is_gguf_available

    if not is_gguf_available():
        raise DependencyError(
            f"{option} {file} is a GGUF file, which needs the gguf package (>= {GGUF_MIN_VERSION}): {GGUF_INSTALL}."
        )


def load_args(name: str, option: str = "--model") -> tuple[str, dict]:
    """What `from_pretrained` takes for `name`: (folder, {"gguf_file": file name}) for a GGUF, else (name, {})."""
    file = gguf_file(name, option)
    if file is None:
        return name, {}
    require_gguf(file, option)
    return str(file.parent), {"gguf_file": file.name}


def gguf_problem(file: Path) -> str | None:
    """What is wrong with a `.gguf` file that cannot load (empty, not GGUF, cut off in its header or its tensors) and
    the fix, read with the `gguf` package's own reader; None if every tensor lies whole inside the file."""
    from gguf import GGUFReader

    again = "Download or convert the model again."
    size = file.stat().st_size
    if size == 0:
        return f"is empty (0 bytes). {again}"
    with file.open("rb") as f:
        head = f.read(16)
    if not head.startswith(b"GGUF"):
        if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
            return (
                "is a safetensors file, not GGUF. Put it in a model folder (config.json, tokenizer files, "
                "model.safetensors) and give that folder."
            )
        return f"is not a GGUF file (it starts with {head[:8]!r}, not b'GGUF'). {again}"
    try:
        tensors = GGUFReader(str(file)).tensors
    except (ValueError, IndexError, KeyError, OverflowError, struct.error) as error:
        said = str(error).splitlines()[0].rstrip(".") if str(error) else type(error).__name__
        return f"is cut off or corrupt ({size} bytes; the GGUF reader says: {said}). {again}"
    end = max((t.data_offset + t.n_bytes for t in tensors), default=0)
    if not tensors:
        return f"holds no tensors. {again}"
    return f"is cut off ({size} bytes of {end}). {again}" if end > size else None


def gguf_fingerprint(file: Path) -> str:
    """A GGUF file by content, cheaply: its whole header (metadata, tokenizer, template, every tensor's name, type,
    shape and offset) and three `SAMPLE_BYTES` samples of the tensor data (start, middle, end)."""
    stat = file.stat()
    return _gguf_fingerprint(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _gguf_fingerprint(path: str, size: int, mtime_ns: int) -> str:
    from gguf import GGUFReader

    start = GGUFReader(path).data_offset  # where the tensor data begins: all before it is header
    digest = hashlib.sha256(f"gguf:{size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(start))
        data = size - start
        for offset in sorted({0, max(data - SAMPLE_BYTES, 0) // 2, max(data - SAMPLE_BYTES, 0)}):
            f.seek(start + offset)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def convert_gguf(file: str, output: str) -> Path:
    """Save a GGUF file's de-quantised weights, tokenizer and chat template as a model folder (safetensors), for
    `poft train` and any tool that reads model folders. The folder appears complete or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(file).expanduser()
    require_gguf(path, "convert_gguf")
    problem = gguf_problem(path)
    if problem:
        raise ModelError(f"convert_gguf {file}: {path.name} {problem}")
    if Path(output).exists():
        raise OutputError(f"{output} exists; give convert_gguf a new folder.")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return save_dequantised(model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), output)


def save_dequantised(model, tokenizer, output: str) -> Path:
    """Save a GGUF-loaded model as an ordinary float32 checkpoint. transformers refuses `save_pretrained` on a
    GGUF-loaded model (it counts as quantised), so its weights move into a model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM

    target = Path(output)
    if target.exists():
        raise OutputError(f"{target} exists; give a new folder for the de-quantised model.")
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.rename(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
