"""Packed scoring keeps conversations apart: every attention path this machine runs, against each conversation alone.

For each implementation, skewed-length conversations are scored packed into padding-free rows and padded
(length-sorted batches), and compared with each conversation scored on its own with the same
implementation and dtype; a deliberately leaky variant (the same packed rows with their position ids
running on across conversations, so no implementation can tell them apart) shows how large a leak is.
Also times one pass of each layout.

    python bench/packed_attention.py                    # CPU: sdpa, eager, flex_attention (compiles: minutes)
    python bench/packed_attention.py --shape llama-1b   # GPU: adds poft_varlen (PyTorch's varlen kernel), bf16
"""

from __future__ import annotations

import argparse
import time

import torch
from common import SHAPES, device, device_name, make_model, write_json
from scoring import make_data
from trl.trainer.utils import add_fused_lm_head

from poft.attention import FLEX, VARLEN, packing_pays, torch_varlen_supported
from poft.batching import collate_packed, iter_scores, score_packed_batch


def scores_of(model, data, on, packing: bool, batch_tokens: int) -> tuple[torch.Tensor, float]:
    scores = torch.zeros(len(data))
    if on.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch, means, _, _ in iter_scores(model, data, 0, batch_tokens, on, "check", packing):
        scores[batch] = torch.tensor(means)
    if on.type == "cuda":
        torch.cuda.synchronize()
    return scores, time.perf_counter() - start


@torch.no_grad()
def leaky_scores(model, data, on) -> torch.Tensor:
    """One packed row whose position ids run on: attention cannot see where a conversation starts."""
    batch = collate_packed(data, on)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1], device=on)[None]
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        batch.pop(key)
    means, _, _ = score_packed_batch(model, batch, len(data))
    return means.cpu()


def check(model, data, small, on, batch_tokens: int) -> dict:
    """Largest score differences from each conversation alone, and the seconds of one pass per layout."""
    alone = torch.tensor([scores_of(model, [e], on, False, batch_tokens)[0].item() for e in small])
    scores_of(model, data, on, True, batch_tokens)  # warm-up (flex attention compiles here)
    packed, packed_s = scores_of(model, data, on, True, batch_tokens)
    padded, padded_s = scores_of(model, data, on, False, batch_tokens)
    leaky = leaky_scores(model, small, on)
    return {
        "packed_vs_alone": (packed[: len(small)] - alone).abs().max().item(),
        "padded_vs_alone": (padded[: len(small)] - alone).abs().max().item(),
        "leaky_vs_alone": (leaky - alone).abs().max().item(),
        "packed_vs_padded": (packed - padded).abs().max().item(),
        "packed_s": packed_s,
        "padded_s": padded_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--mean_length", type=float, default=300)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--batch_tokens", type=int, default=8192)
    parser.add_argument("--implementations", help="comma-separated (default: every one this machine runs)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    on = device()
    dtype = torch.bfloat16 if on.type == "cuda" else torch.float32
    implementations = ([VARLEN] if torch_varlen_supported(on) else []) + ["sdpa", "eager", FLEX]
    if args.implementations:
        implementations = args.implementations.split(",")
    data = make_data(args.samples, args.mean_length, args.max_length, SHAPES[args.shape]["vocab_size"], seed=1)
    small = data[: min(len(data), 8)]  # alone-scoring and the leaky row stay cheap
    print(f"device: {device_name(on)}  {dtype}  shape: {args.shape}  conversations: {len(data)} (alone: {len(small)})")
    print("| attention | packed vs alone | padded vs alone | leaky vs alone | packed s | padded s | packing pays |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    results = {"device": device_name(on), "dtype": str(dtype), "shape": args.shape, "implementations": {}}
    for implementation in implementations:
        model = make_model(args.shape, on, dtype, implementation).eval()
        add_fused_lm_head(model, cast_lm_head_to_fp32=True)
        try:
            row = check(model, data, small, on, args.batch_tokens)
        except Exception as error:  # a path this machine cannot run: report it and go on with the others
            row = {"error": f"{type(error).__name__}: {error}"[:500]}
            print(f"| {implementation} | failed: {row['error'][:200]} | | | | | |", flush=True)
        else:
            row["packing_pays"] = packing_pays(implementation, on)
            print(
                f"| {implementation} | {row['packed_vs_alone']:.1e} | {row['padded_vs_alone']:.1e} | "
                f"{row['leaky_vs_alone']:.1e} | {row['packed_s']:.3f} | {row['padded_s']:.3f} | {row['packing_pays']} |",
                flush=True,
            )
        results["implementations"][implementation] = row
        if args.json:  # after each one, so a run stopped by its time limit keeps what it measured
            write_json(args.json, results)
        del model


if __name__ == "__main__":
    main()
