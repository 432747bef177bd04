"""Reference scoring speed and memory: poft's scorer against the public PoFT code's strategy, side by side.

Same model, same data, same device, in one run. The public strategy pads every sample to max_length,
runs a fixed batch size and builds the full (batch, length, vocab) logits before log_softmax; poft's
sorts by length, fills batches to a token budget and takes per-token log-probs from TRL's fused LM head.
Each method runs in its own subprocess, alternating, so peak memory (VmHWM above the post-setup RSS on
CPU, max_memory_allocated on GPU) is measured per method. The scores of both must agree.

    python bench/scoring.py                       # CPU: a small random Llama, vocab 32000
    python bench/scoring.py --shape llama-1b      # GPU: the Llama-3.2-1B shape of issue 5, bf16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from poft.batching import iter_scores
from poft.chat import EncodedConversation

SHAPES = {
    "tiny": {
        "vocab_size": 32000,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "llama-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}


def make_data(n: int, mean_length: float, max_length: int, vocab: int, seed: int = 0) -> list[EncodedConversation]:
    """Log-normal lengths (sigma 0.6) around `mean_length`; the last 60% of each sequence is the response."""
    generator = torch.Generator().manual_seed(seed)
    mu = math.log(mean_length) - 0.18
    data = []
    for _ in range(n):
        length = int(min(max_length, max(16, math.exp(mu + 0.6 * torch.randn(1, generator=generator).item()))))
        ids = torch.randint(4, vocab, (length,), generator=generator).tolist()
        prompt = int(0.4 * length)
        data.append(EncodedConversation(ids, [0] * prompt + [1] * (length - prompt), truncated=False))
    return data


def public_strategy(model, data, max_length: int, batch_size: int, device) -> list[float]:
    """Pad to max_length, fixed batch size, full logits, log_softmax over the vocabulary."""
    scores = []
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size]
        ids = torch.zeros(len(batch), max_length, dtype=torch.long)
        mask = torch.zeros(len(batch), max_length, dtype=torch.long)
        response = torch.zeros(len(batch), max_length, dtype=torch.bool)
        for row, e in enumerate(batch):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[row, : len(e.input_ids)] = 1
            response[row, : len(e.input_ids)] = torch.tensor(e.response_mask, dtype=torch.bool)
        ids, mask, response = ids.to(device), mask.to(device), response.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            selected = response[:, 1:]
            means = (token_logps * selected).sum(-1) / selected.sum(-1)
        scores += means.tolist()
    return scores


def poft_strategy(model, data, batch_tokens: int, device) -> list[float]:
    scores = [0.0] * len(data)
    for batch, means, _ in iter_scores(model, data, 0, batch_tokens, device, "poft"):
        for i, m in zip(batch, means, strict=False):
            scores[i] = m
    return scores


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def worker(args) -> None:
    """One measurement of one method; prints a JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape], attn_implementation="sdpa")).to(device, dtype).eval()
    add_fused_lm_head(model, cast_lm_head_to_fp32=True)
    data = make_data(args.samples, args.mean_length, args.max_length, model.config.vocab_size)
    run = (
        (lambda: public_strategy(model, data, args.max_length, args.public_batch, device))
        if args.method == "public"
        else (lambda: poft_strategy(model, data, args.batch_tokens, device))
    )
    run()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = rss_kib("VmRSS:")
    start = time.perf_counter()
    scores = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else (rss_kib("VmHWM:") - baseline) / 1024
    )
    tokens = sum(len(e.input_ids) for e in data)
    params = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "method": args.method,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "peak_mib": peak,
                "flops_per_s": 2 * params * tokens / seconds,
                "scores": scores,
                "device": str(device),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--mean_length", type=float, default=300)
    parser.add_argument(
        "--max_length", type=int, default=1024, help="the public strategy pads to this (its code: 4096)"
    )
    parser.add_argument("--public_batch", type=int, default=12)
    parser.add_argument("--batch_tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=790.0,
        help="bf16 dense peak for MFU (H100/H200: ~790 sparse-free per issue 5)",
    )
    parser.add_argument("--method", choices=["public", "poft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return worker(args)
    passthrough = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("method", "repeats") and v is not None]
    results: dict[str, list[dict]] = {"public": [], "poft": []}
    for _ in range(args.repeats):
        for method in ("public", "poft"):  # alternate, so machine noise hits both alike
            out = subprocess.run(
                [sys.executable, __file__, f"--method={method}", *passthrough],
                capture_output=True,
                text=True,
                check=True,
            )
            results[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    public, ours = results["public"], results["poft"]
    difference = max(abs(a - b) for a, b in zip(public[0]["scores"], ours[0]["scores"], strict=False))
    speed = {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in results.items()}
    memory = {m: statistics.median(r["peak_mib"] for r in rs) for m, rs in results.items()}
    flops = {m: statistics.median(r["flops_per_s"] for r in rs) for m, rs in results.items()}
    print(
        f"device: {ours[0]['device']}  shape: {args.shape}  samples: {args.samples}  mean length ~{args.mean_length:g}  max_length {args.max_length}"
    )
    print("| method | real tokens/s | peak memory (MiB) | MFU (2*params*tokens) |")
    print("| --- | --- | --- | --- |")
    for method in ("public", "poft"):
        mfu = f"{100 * flops[method] / (args.peak_tflops * 1e12):.1f}%" if "cuda" in ours[0]["device"] else "-"
        print(f"| {method} | {speed[method]:,.0f} | {memory[method]:,.0f} | {mfu} |")
    print(
        f"speed ratio poft/public: {speed['poft'] / speed['public']:.2f}x   memory ratio poft/public: {memory['poft'] / memory['public']:.2f}   max |score difference|: {difference:.2e}"
    )


if __name__ == "__main__":
    main()
