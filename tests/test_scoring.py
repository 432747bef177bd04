"""Reference scoring: equal to a slow independent computation, cached, resumable, and reported when empty."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

import poft.scoring as scoring
from poft.batching import packed_batches, token_budget_batches
from poft.chat import ConversationEncoder
from poft.score_cache import ScoreCache
from poft.scoring import ScoreConfig, parse_references, score_dataset
from tests import processes
from tests.conftest import as_dataset, make_conversations, two_cpu_processes, write_jsonl


def slow_score(model_path: str, messages: list[dict], max_length: int | None = None) -> tuple[float, int, float]:
    """Full forward, log_softmax over the whole vocabulary, gather, mask: one conversation at a time. Returns the
    mean response log-prob, the response-token count and the mean entropy -sum p log p at those positions."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    encoded = ConversationEncoder(tokenizer, max_length=max_length).encode(messages)
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    distribution = torch.log_softmax(logits, -1)
    token_log_probs = distribution.gather(-1, ids[0, 1:, None]).squeeze(-1)
    entropy = -(distribution.exp() * distribution).sum(-1)
    mask = torch.tensor(encoded.response_mask[1:], dtype=torch.bool)
    return token_log_probs[mask].mean().item(), int(mask.sum()), entropy[mask].mean().item()


def test_scores_equal_slow_computation(tiny_models, conversations, tmp_path):
    dataset = as_dataset(conversations)
    config = ScoreConfig(cache_dir=str(tmp_path / "cache"), batch_tokens=300, device="cpu")
    scored = score_dataset(dataset, [tiny_models["chatml"], tiny_models["zephyr"]], config)
    for name in ("chatml", "zephyr"):
        for messages, score, count, entropy in zip(
            conversations, scored[f"score_{name}"], scored[f"n_tokens_{name}"], scored[f"entropy_{name}"], strict=True
        ):
            expected, expected_count, expected_entropy = slow_score(tiny_models[name], messages)
            assert score == pytest.approx(expected, abs=1e-5)
            assert count == expected_count
            assert entropy == pytest.approx(expected_entropy, abs=1e-5)
    for row in scored:
        assert row["ref_score"] == pytest.approx((row["score_chatml"] + row["score_zephyr"]) / 2)
        assert row["ref_entropy"] == pytest.approx((row["entropy_chatml"] + row["entropy_zephyr"]) / 2)


def test_cached_scores_without_entropy_are_scored_again(tiny_models, conversations, tmp_path, caplog):
    """A cache written before poft cached entropies serves no row whose entropy is missing: those rows are scored
    again (and said so), and the result equals a fresh cache's; an entropy that is no number >= 0 is corrupt."""
    config = ScoreConfig(cache_dir=str(tmp_path / "cache"), device="cpu")
    fresh = score_dataset(as_dataset(conversations), [tiny_models["chatml"]], config)
    (cache_file,) = (tmp_path / "cache").glob("*.jsonl")
    lines = [json.loads(line) for line in cache_file.read_text().splitlines()]
    assert all(line["entropy"] > 0 for line in lines)
    older = [{k: v for k, v in line.items() if k != "entropy"} for line in lines]
    cache_file.write_text("".join(json.dumps(line) + "\n" for line in older))
    with caplog.at_level(logging.INFO, logger="poft"):
        again = score_dataset(as_dataset(conversations), [tiny_models["chatml"]], config)
    assert f"{len(lines)} cached scores lack the reference's entropy" in caplog.text
    assert again["entropy_chatml"] == pytest.approx(fresh["entropy_chatml"], abs=1e-6)
    assert again["score_chatml"] == pytest.approx(fresh["score_chatml"], abs=1e-6)
    cache_file.write_text(json.dumps({**lines[0], "entropy": -1.0}) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="poft"):
        score_dataset(as_dataset(conversations), [tiny_models["chatml"]], config)
    assert "an entropy that is not a finite number >= 0: -1.0" in caplog.text


def test_fully_truncated_response_is_null_and_reported(tiny_models, conversations, tmp_path, caplog):
    long_prompt = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    dataset = as_dataset([conversations[0], long_prompt])
    config = ScoreConfig(cache_dir=str(tmp_path / "c"), max_length=150, device="cpu")
    scored = score_dataset(dataset, [tiny_models["chatml"]], config)
    assert scored["ref_score"][1] is None and scored["n_tokens_chatml"][1] == 0
    assert scored["ref_score"][0] == pytest.approx(
        slow_score(tiny_models["chatml"], conversations[0], 150)[0], abs=1e-5
    )
    assert "no response token left" in caplog.text


def test_token_budget_batches_cover_every_row_once_within_budget():
    lengths = [5, 17, 3, 17, 9, 40, 1, 8]
    batches = list(token_budget_batches(lengths, 34))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 34
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)


@pytest.mark.parametrize("max_padding", [0.0, 0.2, 0.5, 1.0])
def test_padded_batches_keep_padding_within_the_bound_and_split_only_when_needed(max_padding):
    lengths = [random.Random(seed).choice([3, 7, 40, 41, 200, 230, 500]) for seed in range(60)]
    budget = 2048
    batches = list(token_budget_batches(lengths, budget, max_padding))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch, following in zip(batches, batches[1:] + [None], strict=True):
        width, real = max(lengths[i] for i in batch), sum(lengths[i] for i in batch)
        assert len(batch) == 1 or (len(batch) * width <= budget and real >= (1 - max_padding) * len(batch) * width)
        if following is not None:  # split because the next conversation would break the budget or the bound
            grown = real + lengths[following[0]]
            assert (len(batch) + 1) * width > budget or grown < (1 - max_padding) * (len(batch) + 1) * width


def test_reference_names_are_unique_and_column_safe():
    refs = parse_references(["org/model-a", "other/model-a", "judge=./x/y", "/p/q r/"])
    assert [r.name for r in refs] == ["model-a", "model-a_2", "judge", "q_r"]
    assert refs[2].path == "./x/y"


def test_adding_a_reference_scores_only_that_one(tiny_models, conversations, tmp_path, monkeypatch):
    dataset = as_dataset(conversations)
    config = ScoreConfig(cache_dir=str(tmp_path / "cache"), device="cpu")
    first = score_dataset(dataset, [tiny_models["chatml"]], config)
    loaded = []
    original = scoring.load_for_scoring
    monkeypatch.setattr(scoring, "load_for_scoring", lambda spec, *a: loaded.append(spec.path) or original(spec, *a))
    both = score_dataset(dataset, [tiny_models["chatml"], tiny_models["zephyr"]], config)
    assert loaded == [tiny_models["zephyr"]]
    assert both["score_chatml"] == first["score_chatml"]
    assert both["ref_score"] != first["ref_score"]


def test_a_model_by_any_spelling_or_copy_scores_once(tiny_models, conversations, tmp_path, monkeypatch):
    """The cache knows a model by its content: DIR, ./DIR, DIR/ and a copied folder share one cache file."""
    model = Path(tmp_path / "ref")
    shutil.copytree(tiny_models["zephyr"], model)
    copy = tmp_path / "moved" / "copy-of-ref"
    shutil.copytree(model, copy)
    monkeypatch.chdir(tmp_path)
    dataset = as_dataset(conversations)
    cache = tmp_path / "cache"
    config = ScoreConfig(cache_dir=str(cache), device="cpu")
    forwards = []
    original = scoring.iter_scores
    monkeypatch.setattr(
        scoring,
        "iter_scores",
        lambda model, encoded, *a, **k: forwards.append(len(encoded)) or original(model, encoded, *a, **k),
    )
    results = [score_dataset(dataset, [spelling], config)["ref_score"] for spelling in ("ref", "./ref", "ref/")]
    results.append(score_dataset(dataset, [str(copy)], config)["ref_score"])
    assert forwards == [len(set(dataset["poft_id"]))]  # every row scored once, by the first run only
    assert all(r == results[0] for r in results)
    assert len(list(cache.glob("*.jsonl"))) == 1 and len(list(cache.glob("*.json"))) == 1


STOPPED_SCORER = """
import poft.score_cache as score_cache

append, batches = score_cache.ScoreCache.append, []


def append_then_stop(self, records):
    append(self, records)
    batches.append(len(records))
    if len(batches) == 3:
        stop_here(f"{sum(batches)} rows cached")


score_cache.ScoreCache.append = append_then_stop
from poft.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_without_losing_or_duplicating_rows(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", make_conversations(40, seed=3))
    cache = tmp_path / "cache"
    args = ["score", "--data", data, "--model", tiny_models["chatml"], "--batch-tokens", "200", "--device", "cpu"]
    # the child imports the poft under test (not an installed copy) and the tests package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(scoring.__file__).parents[1]), os.getcwd()])}
    process = processes.start(
        STOPPED_SCORER, *args, "--output", str(tmp_path / "killed"), "--cache_dir", str(cache), env=env
    )
    said = processes.reached(process, timeout=300)  # SIGKILLed once three batches are cached
    assert said.endswith(" rows cached"), said
    processes.sigkill(process)
    (cache_file,) = cache.glob("*.jsonl")
    partial = len(cache_file.read_text().splitlines())
    assert partial == int(said.split()[0]) < 40

    from poft.cli import main

    assert main([*args, "--output", str(tmp_path / "resumed"), "--cache_dir", str(cache)]) == 0
    assert main([*args, "--output", str(tmp_path / "fresh"), "--cache_dir", str(tmp_path / "cache2")]) == 0
    resumed, fresh = load_from_disk(str(tmp_path / "resumed")), load_from_disk(str(tmp_path / "fresh"))
    assert resumed["poft_id"] == fresh["poft_id"] and len(resumed) == 40
    assert resumed["score_chatml"] == pytest.approx(fresh["score_chatml"], abs=1e-5)
    ids = [json.loads(line)["poft_id"] for line in cache_file.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == len(set(resumed["poft_id"]))
    meta = json.loads((tmp_path / "resumed" / "poft_score.json").read_text())
    assert meta["references"][0]["path"] == tiny_models["chatml"]


def test_torn_last_line_is_rescored(tiny_models, conversations, tmp_path, caplog):
    config = ScoreConfig(cache_dir=str(tmp_path / "cache"), device="cpu")
    first = score_dataset(as_dataset(conversations), [tiny_models["chatml"]], config)
    (cache_file,) = (tmp_path / "cache").glob("*.jsonl")
    lines = cache_file.read_text().splitlines()
    cache_file.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    again = score_dataset(as_dataset(conversations), [tiny_models["chatml"]], config)
    assert again["score_chatml"] == pytest.approx(first["score_chatml"], abs=1e-6)
    cache_file.write_text("garbage\n" + "\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="poft"):
        garbled = score_dataset(as_dataset(conversations), [tiny_models["chatml"]], config)
    assert garbled["score_chatml"] == pytest.approx(first["score_chatml"], abs=1e-6)
    assert "lines are corrupt and ignored (first: line 1, not JSON text" in caplog.text


def test_two_processes_shard_the_work_and_merge_in_order(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", make_conversations(30, seed=8))
    args = ["score", "--data", data, "--model", tiny_models["zephyr"], "--batch_tokens", "300", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = processes.run(
        [*two_cpu_processes(), *args, "--output", str(tmp_path / "two"), "--cache_dir", str(tmp_path / "c2")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    shards = sorted((tmp_path / "c2").glob("*.shard*.jsonl"))
    assert [len(s.read_text().splitlines()) for s in shards] == [15, 15]
    from poft.cli import main

    assert main([*args, "--output", str(tmp_path / "one"), "--cache_dir", str(tmp_path / "c1")]) == 0
    two, one = load_from_disk(str(tmp_path / "two")), load_from_disk(str(tmp_path / "one"))
    assert two["poft_id"] == one["poft_id"]
    assert two["score_zephyr"] == pytest.approx(one["score_zephyr"], abs=1e-5)


def _append_many(directory: str, worker: int) -> None:
    cache = ScoreCache(Path(directory), "fp", {})
    for batch in range(40):
        cache.append(
            [{"poft_id": f"{worker}-{batch}-{i}-" + "x" * 200, "score": -1.0, "n_tokens": 3} for i in range(50)]
        )
        cache.load()  # readers must never cut a line another process is writing


def test_concurrent_runs_can_share_a_cache(tmp_path):
    import multiprocessing

    workers = [
        multiprocessing.get_context("spawn").Process(target=_append_many, args=(str(tmp_path), w)) for w in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert len(ScoreCache(tmp_path, "fp", {}).load()) == 2 * 40 * 50


@pytest.mark.parametrize("name", ["chatml", "zephyr"])
def test_packed_scores_equal_padded(tiny_models, conversations, tmp_path, name):
    dataset = as_dataset(conversations)
    padded = score_dataset(
        dataset, [tiny_models[name]], ScoreConfig(cache_dir=str(tmp_path / "a"), device="cpu", packing=False)
    )
    packed = score_dataset(
        dataset,
        [tiny_models[name]],
        ScoreConfig(cache_dir=str(tmp_path / "b"), device="cpu", packing=True, batch_tokens=400),
    )
    assert packed[f"n_tokens_{name}"] == padded[f"n_tokens_{name}"]
    assert packed[f"score_{name}"] == pytest.approx(padded[f"score_{name}"], abs=1e-5)
    assert packed[f"entropy_{name}"] == pytest.approx(padded[f"entropy_{name}"], abs=1e-5)


def test_packed_batches_fill_the_budget_without_padding():
    lengths = [5, 17, 3, 17, 9, 40, 1, 8]
    batches = list(packed_batches(lengths, 34))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) == 1 or sum(lengths[i] for i in b) <= 34 for b in batches)
