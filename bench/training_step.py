"""Training step cost: PoFT against SFT, padded against packed batches, side by side in one run.

The same PoFTTrainer and config, differing only in `loss_type` and the batch layout, on conversations of
skewed (log-normal) lengths. Each configuration runs in its own subprocess, alternating, and reports the
median step time and real-token throughput (first steps excluded; a packed step carries more
conversations than a padded one, so layouts compare by throughput) and the peak memory above the
post-setup level (VmHWM on CPU, max_memory_allocated on GPU).

    python bench/training_step.py                  # CPU: a small random Llama
    python bench/training_step.py --shape llama-1b # GPU: the Llama-3.2-1B shape of issue 5, bf16
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
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from poft.data import conversation_id
from poft.demo.builders import char_tokenizer
from poft.trainer import PoFTConfig, PoFTTrainer

SHAPES = {
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}
CONFIGS = {
    "sft-padded": ("sft", False),
    "poft-padded": ("poft", False),
    "sft-packed": ("sft", True),
    "poft-packed": ("poft", True),
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


class StepTimer(TrainerCallback):
    """Seconds and real (non-padding) input tokens of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start, self.seen = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)
        self.tokens.append(state.num_input_tokens_seen - self.seen)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def worker(args) -> None:
    loss_type, packed = CONFIGS[args.config]
    cuda = torch.cuda.is_available()
    tokenizer = char_tokenizer("abcdefghij ")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), **SHAPES[args.shape], pad_token_id=tokenizer.pad_token_id)
    )
    data = make_dataset(args.samples, args.mean_chars)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = PoFTConfig(
            output_dir=out,
            loss_type=loss_type,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            max_length=args.max_length,
            packing=packed,
            padding_free=packed,
            learning_rate=1e-4,
            gradient_checkpointing=False,
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
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        baseline = rss_kib("VmRSS:")
        trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else (rss_kib("VmHWM:") - baseline) / 1024
    seconds, tokens = sum(timer.times[3:]), sum(timer.tokens[3:])  # the first steps warm up
    print(
        json.dumps(
            {
                "config": args.config,
                "step_s": statistics.median(timer.times[3:]),
                "tokens_per_s": tokens / seconds,
                "peak_mib": peak,
                "device": "cuda" if cuda else "cpu",
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--mean_chars", type=float, default=200)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        return worker(args)
    passthrough = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("config", "repeats")]
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name in CONFIGS:  # alternate, so machine noise hits every configuration alike
            out = subprocess.run(
                [sys.executable, __file__, f"--config={name}", *passthrough],
                capture_output=True,
                text=True,
                check=True,
            )
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    step = {n: statistics.median(r["step_s"] for r in rs) for n, rs in results.items()}
    speed = {n: statistics.median(r["tokens_per_s"] for r in rs) for n, rs in results.items()}
    memory = {n: statistics.median(r["peak_mib"] for r in rs) for n, rs in results.items()}
    print(
        f"device: {results['sft-padded'][0]['device']}  shape: {args.shape}  batch {args.batch_size}  samples {args.samples}  mean chars ~{args.mean_chars:g}"
    )
    print("| configuration | median step (s) | real tokens/s | peak memory above setup (MiB) |")
    print("| --- | --- | --- | --- |")
    for name in CONFIGS:
        print(f"| {name} | {step[name]:.4f} | {speed[name]:,.0f} | {memory[name]:,.0f} |")
    for layout in ("padded", "packed"):
        print(
            f"PoFT/SFT step time ({layout}): {step[f'poft-{layout}'] / step[f'sft-{layout}']:.3f}x   "
            f"peak memory: {memory[f'poft-{layout}'] / memory[f'sft-{layout}']:.3f}x"
        )
    print(f"packed/padded throughput (PoFT, real tokens/s): {speed['poft-packed'] / speed['poft-padded']:.2f}x")


if __name__ == "__main__":
    main()
