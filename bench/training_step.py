"""Training step cost: PoFT against SFT, padded against packed batches, side by side in one run.

The same PoFTTrainer and config, differing only in `objective` and the batch layout, on conversations of
skewed (log-normal) lengths. Each configuration runs in its own subprocess, alternating, and reports the
median step time (on CPU: CPU-seconds of the process; run with OMP_NUM_THREADS=1) and real-token throughput
(first steps excluded; a packed step carries more conversations than a padded one, so layouts compare by
throughput) and the peak memory above the
post-setup level on CPU (VmHWM), the peak allocated on GPU (max_memory_allocated, weights and optimizer
included). Padded layouts run sdpa; packed ones the attention `bench/scoring.py` packs with (PyTorch's
varlen kernel on a recent GPU, flex attention on other GPUs, sdpa on CPU). The `-fused` configurations are the
trainer before response-only log-probs (`poft.logprobs`): TRL's fused LM head over every position.

    python bench/training_step.py                  # CPU: a small random Llama
    python bench/training_step.py --shape llama-1b # GPU: the Llama-3.2-1B shape (1.24B), bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from common import SHAPES, device, device_name, emit, make_model, peak_mib, reset_peak, write_json
from datasets import Dataset
from scoring import packed_attention
from transformers import TrainerCallback

import poft.trainer as trainer_module
from poft.demo.builders import char_tokenizer
from poft.schema import conversation_id
from poft.trainer import PoFTConfig, PoFTTrainer

# name: (objective, packed, log-probs from the response positions alone or, as before, TRL's fused head everywhere)
CONFIGS = {
    "sft-padded-fused": ("sft", False, "fused"),
    "poft-padded-fused": ("poft", False, "fused"),
    "sft-padded": ("sft", False, "response"),
    "poft-padded": ("poft", False, "response"),
    "sft-packed": ("sft", True, "response"),
    "poft-packed": ("poft", True, "response"),
}


def make_dataset(n: int, mean_chars: float, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = int(min(4 * mean_chars, max(8, math.exp(math.log(mean_chars) - 0.18 + 0.6 * rng.gauss(0, 1)))))
        text = "".join(rng.choice("abcdefghij ") for _ in range(length))
        cut = int(0.4 * length)
        messages = [
            {"role": "user", "content": text[:cut] or "a"},
            {"role": "assistant", "content": text[cut:] or "b"},
        ]
        rows.append({"messages": messages, "poft_id": conversation_id(messages), "ref_score": -2.0 + rng.random()})
    return Dataset.from_list(rows)


def clock() -> float:
    """Wall time on GPU; on CPU this process's CPU time, which a shared machine's load does not inflate."""
    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


class StepTimer(TrainerCallback):
    """Seconds and real (non-padding) input tokens of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start, self.seen = clock(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(clock() - self.start)
        self.tokens.append(state.num_input_tokens_seen - self.seen)


def worker(args) -> None:
    objective, packed, head = CONFIGS[args.config]
    if head == "fused":  # the trainer before response-only log-probs
        trainer_module.response_log_probs = lambda model, inputs, outputs: model(**inputs, fused_lm_head=True)
    on = device()
    cuda = on.type == "cuda"
    tokenizer = char_tokenizer("abcdefghij ")
    attn = packed_attention(on) if packed else "sdpa"
    vocab = args.vocab_size or (len(tokenizer) if args.shape == "tiny" else SHAPES[args.shape]["vocab_size"])
    model = make_model(args.shape, on, torch.float32, attn, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
    data = make_dataset(args.samples, args.mean_chars)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = PoFTConfig(
            output_dir=out,
            objective=objective,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            max_length=args.max_length,
            packing=packed,
            padding_free=packed,
            learning_rate=1e-4,
            activation_checkpointing=False,
            logging_steps=10**6,
            save_strategy="no",
            include_num_input_tokens_seen="non_padding",
            report_to=[],
            bf16=cuda,
            use_cpu=not cuda,
            disable_tqdm=True,
            seed=0,
        )
        trainer = PoFTTrainer(model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
        baseline = reset_peak(on)
        trainer.train()
    peak = peak_mib(on, baseline)
    seconds, tokens = sum(timer.times[3:]), sum(timer.tokens[3:])  # the first steps warm up
    emit(
        {
            "config": args.config,
            "attention": attn,
            "step_s": statistics.median(timer.times[3:]),
            "tokens_per_s": tokens / seconds,
            "peak_mib": peak,
            "device": device_name(on),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument(
        "--vocab_size",
        type=int,
        help="LM head width (default: the tokenizer's for tiny, the shape's for llama-1b, so that the head and "
        "the loss cost what they cost on real data; the data use the first few ids only)",
    )
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--mean_chars", type=float, default=200)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        return worker(args)
    passthrough = [
        f"--{k}={v}"
        for k, v in vars(args).items()
        if k not in ("config", "configs", "repeats", "json") and v is not None
    ]
    results: dict[str, list[dict]] = {name: [] for name in args.configs.split(",")}
    for _ in range(args.repeats):
        for name in results:  # alternate, so machine noise hits every configuration alike
            out = subprocess.run(
                [sys.executable, __file__, f"--config={name}", *passthrough], capture_output=True, text=True
            )
            if out.returncode:
                sys.exit(f"{name} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary: dict = {"device": next(iter(results.values()))[0]["device"], "shape": args.shape, "configs": {}}
    for name, runs in results.items():
        summary["configs"][name] = {
            "attention": runs[0]["attention"],
            "step_s": statistics.median(r["step_s"] for r in runs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "peak_mib": statistics.median(r["peak_mib"] for r in runs),
        }
    configs = summary["configs"]
    layouts = [
        layout
        for layout in ("padded-fused", "padded", "packed")
        if {f"poft-{layout}", f"sft-{layout}"} <= set(configs)
    ]
    for layout in layouts:
        poft, sft = configs[f"poft-{layout}"], configs[f"sft-{layout}"]
        summary[f"poft_vs_sft_step_{layout}"] = poft["step_s"] / sft["step_s"]
        summary[f"poft_vs_sft_memory_{layout}"] = poft["peak_mib"] / sft["peak_mib"]
    if {"poft-packed", "poft-padded"} <= set(configs):
        summary["packed_vs_padded_throughput"] = (
            configs["poft-packed"]["tokens_per_s"] / configs["poft-padded"]["tokens_per_s"]
        )
    for name in ("sft", "poft"):
        if {f"{name}-padded", f"{name}-padded-fused"} <= set(configs):
            summary[f"{name}_response_vs_fused_step"] = (
                configs[f"{name}-padded"]["step_s"] / configs[f"{name}-padded-fused"]["step_s"]
            )
    print(
        f"device: {summary['device']}  shape: {args.shape}  batch {args.batch_size}  samples {args.samples}  "
        f"mean chars ~{args.mean_chars:g}"
    )
    print("| configuration | attention | median step (s) | real tokens/s | peak memory (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for name, c in configs.items():
        print(f"| {name} | {c['attention']} | {c['step_s']:.4f} | {c['tokens_per_s']:,.0f} | {c['peak_mib']:,.0f} |")
    for layout in layouts:
        print(
            f"PoFT/SFT step time ({layout}): {summary[f'poft_vs_sft_step_{layout}']:.3f}x   "
            f"peak memory: {summary[f'poft_vs_sft_memory_{layout}']:.3f}x"
        )
    if "packed_vs_padded_throughput" in summary:
        print(f"packed/padded throughput (PoFT, real tokens/s): {summary['packed_vs_padded_throughput']:.2f}x")
    for name in ("sft", "poft"):
        if f"{name}_response_vs_fused_step" in summary:
            print(
                f"{name} step, response-only / fused head (padded): {summary[f'{name}_response_vs_fused_step']:.3f}x"
            )
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    main()
