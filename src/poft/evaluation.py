"""Evaluate models: benchmark suites through lm-eval-harness, and exact match on data with answers.

Benchmarks default to the Open LLM Leaderboard tasks the paper reports, each with the leaderboard's
few-shot count; any lm-eval task or a local task YAML works too (lm-eval is the optional extra
`poft[eval]`). For data with a checkable answer column, prompts are rendered with the model's own chat
template, decoded greedily and compared with the answer; the held-out likelihood is the same response
score `poft score` computes, so it is comparable with the references'.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poft.batching import model_scores
from poft.chat import ChatTemplateError, ConversationEncoder, shorten
from poft.errors import DataError, DependencyError, OptionError
from poft.models import ModelSpec, model_max_length, parse_references
from poft.options import ModelOptions, ReadingOptions
from poft.outputs import atomic_write_text
from poft.report import eval_table
from poft.schema import MESSAGES

logger = logging.getLogger(__name__)


def exact_match(prediction: str, answer: str) -> bool:
    """The answer check: equal after trimming surrounding whitespace."""
    return prediction.strip() == answer.strip()


def prompt_messages(messages: Sequence[dict]) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:last]]


def as_encoder(reader: ConversationEncoder | PreTrainedTokenizerBase) -> ConversationEncoder:
    """An encoder as given, or a tokenizer's with the default options (its own template, system_turns=auto)."""
    return reader if isinstance(reader, ConversationEncoder) else ConversationEncoder(reader)


def render_prompts(encoder: ConversationEncoder, prompts: Sequence[Sequence[dict]]) -> list[str]:
    """Each prompt as the model completes it (`ConversationEncoder.render_prompt`); a template error names it."""
    texts = []
    for row, prompt in enumerate(prompts, start=1):
        try:
            texts.append(encoder.render_prompt(prompt))
        except ChatTemplateError as error:
            raise ChatTemplateError(f"prompt {row}: {error}") from error
    return texts


ANSWER_MARGIN = 8  # tokens generated beyond the longest answer, at least (a quarter of it when that is more)


def answer_token_bound(tokenizer: PreTrainedTokenizerBase, answers: Sequence[object]) -> int:
    """Enough new tokens to generate any of `answers` and the token that closes the turn: the longest answer in
    `tokenizer`'s tokens plus a margin (it may tokenize differently after the prompt), a quarter or at least 8."""
    longest = max((len(tokenizer(str(a), add_special_tokens=False)["input_ids"]) for a in answers), default=0)
    return longest + max(ANSWER_MARGIN, math.ceil(longest / 4))


def end_of_turn_ids(encoder: ConversationEncoder, model=None) -> list[int]:
    """The tokens at which a reply is over: the special token the chat template closes an assistant turn with (the
    last token of a response, `poft.chat`), the tokenizer's eos and the model's generation-config eos."""
    ids = {encoder.tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        input_ids, _, spans = encoder.encode_spans(probe)
    except ChatTemplateError:  # the template cannot render the probe; the data's own errors come later
        spans = []
    if spans and spans[-1].closing_token is not None:
        ids.add(input_ids[spans[-1].closing_token])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_responses(
    model,
    reader: ConversationEncoder | PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of each prompt (a message list), special tokens removed.

    Prompts are rendered by `poft.chat`, the code that reads conversations for scoring and training; pass a
    `ConversationEncoder` to choose its template and system-turn policy, or a tokenizer for the defaults. Each row
    stops at its end of turn (`end_of_turn_ids`), whichever of the template's closing token and eos comes first.
    """
    encoder = as_encoder(reader)
    tokenizer = encoder.tokenizer
    device = next(model.parameters()).device
    texts = render_prompts(encoder, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = end_of_turn_ids(encoder, model)
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(device)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
        )
        new_tokens = generated[:, batch["input_ids"].size(1) :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    model.train(was_training)
    return outputs


def exact_match_per_row(
    model,
    reader: ConversationEncoder | PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    answer_column: str = "answer",
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> tuple[list[bool], list[str]]:
    """Whether each row's greedy response equals `answer_column` (whitespace-trimmed), and the responses.

    `max_new_tokens` None: enough for the longest answer (`answer_token_bound`), since a longer reply is wrong anyway.
    """
    if answer_column not in dataset.column_names:
        raise DataError(f"The dataset has no {answer_column!r} column to check answers against; pass answer_column.")
    if max_new_tokens is None:
        tokenizer = reader.tokenizer if isinstance(reader, ConversationEncoder) else reader
        max_new_tokens = answer_token_bound(tokenizer, dataset[answer_column])
    prompts = [prompt_messages(m) for m in dataset[MESSAGES]]
    predictions = generate_responses(model, reader, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = [exact_match(p, str(a)) for p, a in zip(predictions, dataset[answer_column], strict=True)]
    return correct, predictions


def exact_match_accuracy(
    model, reader: ConversationEncoder | PreTrainedTokenizerBase, dataset: Dataset, **options
) -> tuple[float, list[str]]:
    """Share of rows whose greedy response equals the answer column (whitespace-trimmed), and the responses;
    `options` are `exact_match_per_row`'s (answer_column, max_new_tokens, batch_size)."""
    correct, predictions = exact_match_per_row(model, reader, dataset, **options)
    return sum(correct) / max(len(predictions), 1), predictions


def heldout_log_likelihood(
    model, reader: ConversationEncoder | PreTrainedTokenizerBase, dataset: Dataset, *, max_length: int | None = None
) -> float:
    """Mean over rows of the mean response log-prob (the PoFT score) on held-out data.

    Given a tokenizer, conversations are truncated to `max_length`; an encoder truncates as it was built to.
    """
    encoder = reader if isinstance(reader, ConversationEncoder) else ConversationEncoder(reader, max_length=max_length)
    scores = model_scores(model, encoder, dataset[MESSAGES])
    kept = [s for s in scores if s is not None]
    return sum(kept) / max(len(kept), 1)


PREDICTIONS = "eval_predictions.jsonl"  # one row per model and --data row: what was asked, said and expected
SHOWN_EXAMPLES = 3  # generations logged per model, so a surprising exact match is explained on the spot


def prediction_rows(
    model: str, dataset: Dataset, generations: Sequence[str], correct: Sequence[bool], answer_column: str
) -> list[dict]:
    """Each row's prompt (its messages before the last assistant turn), greedy generation, answer and verdict."""
    return [
        {
            "model": model,
            "row": row,
            "prompt": prompt_messages(messages),
            "generation": generation,
            "answer": str(answer),
            "verdict": "correct" if ok else "wrong",
        }
        for row, (messages, generation, answer, ok) in enumerate(
            zip(dataset[MESSAGES], generations, dataset[answer_column], correct, strict=True), start=1
        )
    ]


def log_examples(model: str, rows: Sequence[dict]) -> None:
    """A few generations beside their answers, and a hint when wrong answers hold the answer in longer text."""
    for row in rows[:SHOWN_EXAMPLES]:
        logger.info(
            "%s, row %d: %s -> %r (answer %r: %s)",
            model,
            row["row"],
            shorten(row["prompt"][-1]["content"] if row["prompt"] else ""),
            shorten(row["generation"]),
            shorten(row["answer"]),
            row["verdict"],
        )
    inside = sum(
        r["verdict"] == "wrong" and r["answer"].strip() and r["answer"].strip() in r["generation"] for r in rows
    )
    if inside:
        logger.info(
            "%s: %d wrong generations contain the answer within longer text; exact match compares the whole "
            "response (trimmed), so a model that answers in sentences scores low. See %s.",
            model,
            inside,
            PREDICTIONS,
        )


# The Open LLM Leaderboard (v1) tasks the paper reports, with the leaderboard's few-shot settings.
LEADERBOARD_TASKS = ("arc_challenge:25", "hellaswag:10", "truthfulqa_mc2:0", "mmlu:5", "winogrande:5", "gsm8k:5")


@dataclass
class EvalConfig(ModelOptions, ReadingOptions):
    """Options of `poft eval`: its own, after the reading and model groups `poft score` shares."""

    model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Model(s) to evaluate (path or hub id, or NAME=PATH); repeat to compare several side by side."
        },
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "lm-eval tasks as NAME[:FEWSHOT], or 'none'. Default: none when --data is given (the data "
            "alone, nothing downloaded), else the Open LLM Leaderboard set with its few-shot counts."
        },
    )
    task_dir: str | None = field(
        default=None,
        metadata={"help": "A directory of lm-eval task YAML files (local tasks), added to lm-eval's task index."},
    )
    limit: int | None = field(
        default=None,
        metadata={"help": "Evaluate at most this many examples per task (a quick look, not a score to report)."},
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "Data with a checkable answer column: greedy exact match and held-out response log-likelihood."
        },
    )
    answer_column: str = field(default="answer", metadata={"help": "Column of --data holding the expected answer."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Most tokens generated per --data prompt. Default: the longest answer in the model's tokens plus "
            "a margin (a quarter, at least 8); generation stops earlier at the end-of-turn token."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Batch size for both evaluations."})
    output: str = field(default="poft-eval", metadata={"help": "Directory for eval_results.json and eval_table.md."})

    def __post_init__(self):
        if self.tasks is None:
            self.tasks = [] if self.data else list(LEADERBOARD_TASKS)
        self.tasks = [] if [t.lower() for t in self.tasks] == ["none"] else self.tasks
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise OptionError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        for task in self.tasks:
            name, _, shots = task.partition(":")
            if not name or (shots and not shots.isdigit()):
                raise OptionError(f"--tasks entries are NAME or NAME:FEWSHOT (e.g. arc_challenge:25), got {task!r}")
        ReadingOptions.__post_init__(self)
        ModelOptions.__post_init__(self)


def parse_task(task: str) -> tuple[str, int | None]:
    name, _, shots = task.partition(":")
    return name, int(shots) if shots else None


def run_lm_eval(model, tokenizer, tasks: Sequence[str], config: EvalConfig) -> dict[str, dict[str, float]]:
    """lm-eval-harness on an in-memory model, one call per task so each keeps its own few-shot count."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise DependencyError("Benchmark tasks need lm-eval-harness: pip install 'poft[eval]'.") from error
    from huggingface_hub.errors import LocalEntryNotFoundError

    manager = TaskManager(include_path=config.task_dir)
    unknown = [name for name, _ in map(parse_task, tasks) if name not in manager.all_tasks]
    if unknown:
        raise OptionError(
            f"Unknown lm-eval task(s): {', '.join(unknown)}. List tasks with `lm-eval ls tasks`, or put a task "
            "YAML in a directory and pass it with --task_dir."
        )
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=config.batch_size,
        device=str(next(model.parameters()).device),
    )
    scores: dict[str, dict[str, float]] = {}
    for name, shots in map(parse_task, tasks):
        try:
            out = simple_evaluate(
                model=lm, tasks=[name], num_fewshot=shots, limit=config.limit, task_manager=manager, log_samples=False
            )
        except (ConnectionError, LocalEntryNotFoundError) as error:  # hub tasks download their data on first use
            raise DataError(
                f"lm-eval task {name}: its data could not be downloaded ({error}). Connect to the network once so "
                "the data lands in the Hugging Face cache, use a local task YAML (--task_dir DIR), or evaluate "
                "--data alone (--tasks none)."
            ) from error
        for task_name, metrics in out["results"].items():
            scores[task_name] = {
                key.replace(",none", ""): float(value)
                for key, value in metrics.items()
                if isinstance(value, (int, float)) and not key.startswith("alias") and "_stderr" not in key
            }
    return scores


def run_eval(config: EvalConfig) -> dict:
    """`poft eval`: every model on the answer-checked data, then on the lm-eval tasks; JSON plus a comparison table.

    The data goes first and its results are written before any task runs, so a task that fails (its data cannot
    be downloaded, say) loses nothing already measured; the files are rewritten after each model's tasks.
    """
    from poft.data import load_sft_dataset

    if not config.model:
        raise OptionError("poft eval needs at least one --model.")
    if not config.tasks and not config.data:
        raise OptionError("Nothing to evaluate: give --tasks and/or --data.")
    data = load_sft_dataset(config.data) if config.data else None
    references = parse_references(config.model)
    results: dict[str, dict[str, dict[str, float]]] = {r.name: {} for r in references}
    predictions: list[dict] = []
    output = Path(config.output)
    payload = {"models": {r.name: r.path for r in references}, "results": results}
    loaded = None
    if data is not None:
        for reference in references:
            loaded = reference, *_load(reference.path, config)
            rows, scores = _evaluate_data(loaded[1], loaded[2], reference.name, data, config)
            predictions += rows
            results[reference.name].update(scores)
        _write(output, payload, predictions)
    if config.tasks:
        for reference in references:
            model, tokenizer = loaded[1:] if loaded and loaded[0] is reference else _load(reference.path, config)
            loaded = None
            results[reference.name].update(run_lm_eval(model, tokenizer, config.tasks, config))
            _write(output, payload, predictions)
    return payload


def results_table(payload: dict) -> str:
    """The comparison table of one `poft eval` run: what the command prints and writes to eval_table.md."""
    return eval_table([payload])


def _load(path: str, config: EvalConfig):
    """A model to evaluate and its tokenizer, from safetensors weights or a GGUF file (as `poft score` loads)."""
    logger.info("Evaluating %s", path)
    spec = ModelSpec.of(path, config)
    spec.check()
    tokenizer = spec.tokenizer()
    return spec.load(), tokenizer


def _evaluate_data(model, tokenizer, name: str, data: Dataset, config: EvalConfig) -> tuple[list[dict], dict]:
    """Greedy exact match and held-out response log-likelihood on `--data`, and each row's prediction."""
    encoder = ConversationEncoder(
        tokenizer,
        fallback_template=config.chat_template,
        max_length=model_max_length(config.max_length, model.config),
        truncation_mode=config.truncation_mode,  # type: ignore[arg-type]
        system_turns=config.system_turns,  # type: ignore[arg-type]
        name=name,
    )
    correct, generations = exact_match_per_row(
        model,
        encoder,
        data,
        answer_column=config.answer_column,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
    )
    rows = prediction_rows(name, data, generations, correct, config.answer_column)
    log_examples(name, rows)
    scores = {
        "exact_match": sum(correct) / max(len(correct), 1),
        "response_log_likelihood": heldout_log_likelihood(model, encoder, data),
    }
    return rows, {f"data:{Path(config.data).name}": scores}


def _write(output: Path, payload: dict, predictions: list[dict]) -> None:
    """eval_results.json, eval_table.md and, with --data, eval_predictions.jsonl, each written atomically."""
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "eval_results.json", json.dumps(payload, indent=2))
    if predictions:
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions)
        atomic_write_text(output / PREDICTIONS, lines)
        logger.info("Wrote every generation and its verdict to %s", output / PREDICTIONS)
    atomic_write_text(output / "eval_table.md", results_table(payload) + "\n")
