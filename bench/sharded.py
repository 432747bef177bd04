"""FSDP2 and DeepSpeed ZeRO-3 on two CPU processes (gloo) against one process with the same global batch.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONPATH=src python bench/sharded.py

For each engine x objective x (full training, LoRA with a trainable head): 3 SGD steps with the recipes'
accelerate configs (recipes/accelerate/fsdp.yaml, zero3.yaml; float32, 2 processes x batch 2) and with one
process (batch 4), on a tiny Llama and 16 scored conversations built here. Prints a table: the largest loss,
metric (`poft/*`, entropy, token accuracy) and saved-parameter differences over the steps, and the class of the
model each training step received (a silent fallback to DDP or to no distribution shows as NOT SHARDED).
`tests/sharded_runs.py` runs them.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poft.demo.builders import char_tokenizer, save_model, tiny_llama  # noqa: E402
from poft.scoring import ScoreConfig, score_dataset  # noqa: E402
from tests.conftest import as_dataset, make_conversations  # noqa: E402
from tests.sharded_runs import compare  # noqa: E402


def build(root: Path) -> tuple[str, str]:
    """The tiny chat model the tests use and 16 conversations scored by it, shifted so PoFT's weights vary."""
    texts = [m["content"] for c in make_conversations(64, seed=1) for m in c]
    tokenizer = char_tokenizer("".join(texts) + "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    model = str(save_model(tiny_llama(tokenizer, seed=1), tokenizer, root / "model"))
    config = ScoreConfig(cache_dir=str(root / "cache"), max_length=256, device="cpu")
    data = score_dataset(as_dataset(make_conversations()), [model], config)
    data.map(lambda row: {"ref_score": row["ref_score"] + 0.3}).save_to_disk(str(root / "data"))
    return model, str(root / "data")


def wrapper(engine: dict) -> str:
    """The wrapper asserted, in words: FSDP2's module class and what it sharded, or DeepSpeed's engine and stage."""
    if engine["fsdp_modules"]:
        others = [name for name in engine["head_group"] if not name.endswith("lm_head")]
        head = f"head grouped with {', '.join(others)}" if others else "head sharded alone"
        return f"{engine['wrapper'].rsplit('.', 1)[-1]} (FSDPModule, {head})"
    if engine["zero_stage"] is not None:
        return f"DeepSpeedEngine (ZeRO-{engine['zero_stage']})"
    return f"{engine['wrapper']} ({engine['distributed_type']}): NOT SHARDED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["fsdp2", "zero3"], choices=["fsdp2", "zero3"])
    parser.add_argument("--objectives", nargs="+", default=["poft_token", "poft"])
    args = parser.parse_args()
    engines = [e for e in args.engines if e != "zero3" or importlib.util.find_spec("deepspeed") is not None]
    if engines != args.engines:
        print("deepspeed is not installed: ZeRO-3 left out (pip install poft[deepspeed])", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="poft-sharded-") as folder:
        root = Path(folder)
        model, data = build(root)
        for engine in engines:
            for objective in args.objectives:
                for lora in (False, True):
                    result = compare(engine, model, data, objective, lora, root)
                    rows.append((engine, objective, lora, result))
                    print(f"{engine} {objective} {'LoRA' if lora else 'full'}: {result}", file=sys.stderr)
    print(
        "| engine | objective | training | max loss diff | max metric diff | max parameter diff | wrapper asserted |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for engine, objective, lora, result in rows:
        training = "LoRA + trainable head" if lora else "full"
        print(
            f"| {engine} | {objective} | {training} | {result.loss:.1e} | {result.metrics:.1e} | "
            f"{result.parameters:.1e} | {wrapper(result.engine)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
