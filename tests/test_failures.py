"""Every failure a user meets ends in one line naming the thing and the fix (exit 2), and nothing is lost or silent.

Each test runs `poft` in-process (`poft.cli.main`) on the tiny models of conftest and asserts the error's
line, or checks the behaviour against values computed another way.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import poft.score_cache as score_cache
from poft import cli
from poft.cli import main
from poft.errors import CacheError, ScoringError
from poft.score_cache import ScoreCache
from poft.scoring import ScoreConfig, score_dataset
from tests.conftest import as_dataset, write_jsonl


def error_line(capsys) -> str:
    """poft's error line on stderr (progress bars, which may close after it, aside)."""
    errors = re.findall(r"poft \w+: error: .*", capsys.readouterr().err)
    return errors[-1] if errors else ""


def copy_model(source: str, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def with_template(source: str, target: Path, template: str) -> Path:
    copy_model(source, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture
def data(conversations, tmp_path) -> str:
    return write_jsonl(tmp_path / "chats.jsonl", conversations[:4])


def score(data: str, models: list[str], output: Path, cache: Path, *extra: str) -> int:
    argv = ["score", "--data", data, "--output", str(output), "--cache_dir", str(cache), "--device", "cpu"]
    return main(argv + [a for m in models for a in ("--model", m)] + list(extra))


# --------------------------------------------------------------------------- models and devices


def test_missing_model_path(data, tmp_path, capsys):
    assert score(data, ["/no/such/model"], tmp_path / "out", tmp_path / "cache") == 2
    assert error_line(capsys) == (
        "poft score: error: --model /no/such/model: no such model folder. Check the path (hub ids look like org/name)."
    )
    assert not (tmp_path / "out").exists()


def test_model_folder_without_tokenizer_files(tiny_models, data, tmp_path, capsys):
    model = copy_model(tiny_models["zephyr"], tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    assert score(data, [str(model)], tmp_path / "out", tmp_path / "cache") == 2
    assert error_line(capsys).startswith(
        f"poft score: error: --model {model} has no tokenizer files (tokenizer.json, tokenizer_config.json). Save the "
        "tokenizer into the model folder"
    )


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_weights(tiny_models, data, tmp_path, capsys, damage):
    model = copy_model(tiny_models["zephyr"], tmp_path / "m")
    weights = model / "model.safetensors"
    if damage == "missing":
        weights.unlink()
        expected = f"poft score: error: --model {model} has no *.safetensors weights."
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = f"poft score: error: --model {model}: model.safetensors is truncated ("
    assert score(data, [str(model)], tmp_path / "out", tmp_path / "cache") == 2
    assert error_line(capsys).startswith(expected)


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("cuda", "--device cuda is not available on this machine (0 CUDA devices); use --device auto or cpu."),
        ("tpu9", "--device 'tpu9' is not a device; use auto, cpu, cuda, cuda:N or mps."),
    ],
)
def test_unusable_device(tiny_models, data, tmp_path, capsys, device, expected):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["score", "--data", data, "--model", tiny_models["zephyr"], "--output", str(tmp_path / "o")]
    assert main(argv + ["--device", device, "--cache_dir", str(tmp_path / "c")]) == 2
    assert error_line(capsys) == f"poft score: error: {expected}"


def test_same_reference_twice_is_refused(tiny_models, data, tmp_path, capsys):
    same = tiny_models["zephyr"]
    assert score(data, [same, f"again={same}"], tmp_path / "out", tmp_path / "cache") == 2
    assert error_line(capsys) == (
        f"poft score: error: --model {same} is the same model as --model {same} (same fingerprint: the same config, "
        "tokenizer and weight files), so it would count twice in ref_score. Give each reference once."
    )


# --------------------------------------------------------------------------- templates


def test_template_that_raises_names_the_template_and_the_row(tiny_models, data, tmp_path, capsys):
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role allowed') }}{% endif %}"
        "{{ '<|' + m.role + '|>' + m.content + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    model = with_template(tiny_models["zephyr"], tmp_path / "nosystem", template)
    assert score(data, [str(model)], tmp_path / "out", tmp_path / "cache", "--system_turns", "keep") == 2
    line = error_line(capsys)
    assert line.startswith("poft score: error: reference 'nosystem', conversation 1 of the data, poft_id ")
    assert (
        f"{model}: " in line
        and "no system role allowed" in line
        and line.endswith(
            "The conversation has a system turn: pass --system_turns merge to merge it into the user turn."
        )
    )
    assert score(data, [str(model)], tmp_path / "merged", tmp_path / "cache") == 0  # merged by default, as said


def test_template_that_drops_assistant_content_is_named_and_stops(tiny_models, data, tmp_path, capsys):
    template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|assistant|>' }}"
        "{% else %}{{ '<|' + m.role + '|>' + m.content + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    model = with_template(tiny_models["zephyr"], tmp_path / "dropper", template)
    assert score(data, [str(model)], tmp_path / "out", tmp_path / "cache") == 2
    line = error_line(capsys)
    assert line.startswith(f"poft score: error: {model}: cannot locate the response of an assistant turn")
    assert "the template renders assistant content unchanged neither as text nor as text parts" in line
    # the tokenizer has its own template, which --chat_template would not replace: the fix is in the model folder
    assert line.endswith(
        "Fix the template in the model folder (chat_template.jinja or tokenizer_config.json), or use a tokenizer "
        "whose template renders each assistant content unchanged; --chat_template serves only tokenizers without "
        "a template."
    )
    assert "truncat" not in line and not (tmp_path / "out").exists()


def test_rows_without_a_response_token_say_so_and_all_of_them_stop(tiny_models, conversations, tmp_path, caplog):
    """The cause of a null score comes from the cache record: truncation, or no response token in the template."""
    from poft.scoring import ScoreConfig, score_dataset
    from tests.conftest import as_dataset

    long_prompt = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    config = ScoreConfig(cache_dir=str(tmp_path / "c"), max_length=150, device="cpu")
    score_dataset(as_dataset([conversations[0], long_prompt]), [tiny_models["chatml"]], config)
    assert any(
        "1 of 2 conversations have a null score: 1 have no response token left after truncation to 150 tokens"
        in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(ScoringError, match=r"1 of 1 conversations have a null score: .*No row could be scored"):
        score_dataset(as_dataset([long_prompt]), [tiny_models["chatml"]], config)


# --------------------------------------------------------------------------- non-finite scores


def nan_model(source: str, target: Path) -> Path:
    copy_model(source, target)
    weights = load_file(target / "model.safetensors")
    save_file({k: torch.full_like(v, math.nan) for k, v in weights.items()}, target / "model.safetensors")
    return target


def cached_values(cache: Path) -> list:
    """Every score in every cache file, parsed as written (json reads NaN and Infinity tokens back)."""
    return [json.loads(line)["score"] for f in cache.glob("*.jsonl") for line in f.read_text().splitlines()]


def test_nan_weights_stop_with_the_reference_and_rows_and_cache_nothing(tiny_models, data, tmp_path, capsys):
    model = nan_model(tiny_models["zephyr"], tmp_path / "nanref")
    cache = tmp_path / "cache"
    assert score(data, [tiny_models["chatml"], str(model)], tmp_path / "out", cache) == 2
    line = error_line(capsys)  # the conversations of the first batch that met a NaN are named
    assert re.match(
        rf"poft score: error: reference 'nanref' \({re.escape(str(model))}\) gives non-finite log-probs \(NaN or inf\) "
        r"for conversation [1-4] of the data(, conversation [1-4] of the data)*; nothing non-finite was cached or "
        r"written\.",
        line,
    ), line
    values = cached_values(cache)
    assert len(values) == 4 and all(v is not None and math.isfinite(v) for v in values)  # the good reference's
    assert not (tmp_path / "out").exists()


def test_a_nan_in_the_cache_is_rescored(tiny_models, conversations, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversations[:3])
    cache = tmp_path / "cache"
    assert score(data, [tiny_models["zephyr"]], tmp_path / "first", cache) == 0
    expected = load_from_disk(str(tmp_path / "first"))["ref_score"]
    (cache_file,) = cache.glob("*.jsonl")
    lines = cache_file.read_text().splitlines()
    record = json.loads(lines[0])
    cache_file.write_text("\n".join([json.dumps({**record, "score": math.nan})] + lines[1:]) + "\n")
    assert math.isnan(cached_values(cache)[0])
    assert score(data, [tiny_models["zephyr"]], tmp_path / "second", cache) == 0
    assert load_from_disk(str(tmp_path / "second"))["ref_score"] == pytest.approx(expected)


# --------------------------------------------------------------------------- columns and rescoring


def test_input_score_columns_are_refused_unless_overwrite(tiny_models, conversations, tmp_path, capsys):
    rows = [{"messages": m, "ref_score": 0.5} for m in conversations[:3]]
    data = tmp_path / "with_ref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert score(str(data), [tiny_models["zephyr"]], tmp_path / "out", tmp_path / "cache") == 2
    assert error_line(capsys) == (
        f"poft score: error: {data}: the column 'ref_score' is not one poft wrote, and this run would replace it. "
        "Rename it, or pass --overwrite to replace it."
    )
    assert score(str(data), [tiny_models["zephyr"]], tmp_path / "out", tmp_path / "cache", "--overwrite") == 0
    scored = load_from_disk(str(tmp_path / "out"))
    assert scored["ref_score"] == scored["score_zephyr"] != [0.5] * 3


def test_rescoring_drops_other_references_and_averages_exactly_this_run(tiny_models, data, tmp_path, caplog):
    chatml, zephyr, cache = tiny_models["chatml"], tiny_models["zephyr"], tmp_path / "cache"
    assert score(data, [chatml], tmp_path / "a", cache) == 0
    first = load_from_disk(str(tmp_path / "a"))
    assert score(str(tmp_path / "a"), [zephyr], tmp_path / "a", cache, "--overwrite") == 0  # output = the scored set
    rescored = load_from_disk(str(tmp_path / "a"))
    assert not {"score_chatml", "n_tokens_chatml", "entropy_chatml"} & set(rescored.column_names)
    assert rescored["ref_score"] == rescored["score_zephyr"] and rescored["ref_entropy"] == rescored["entropy_zephyr"]
    record = json.loads((tmp_path / "a" / "poft_score.json").read_text())
    dropped = ["score_chatml", "n_tokens_chatml", "entropy_chatml"]
    assert record["dropped_columns"] == dropped and record["kept_columns"] == []
    assert any(f"Dropped {', '.join(dropped)}" in r.getMessage() for r in caplog.records)
    assert score(str(tmp_path / "a"), [chatml, zephyr], tmp_path / "both", cache) == 0
    both = load_from_disk(str(tmp_path / "both"))
    assert both["score_chatml"] == first["score_chatml"]
    assert both["ref_score"] == pytest.approx(
        [(a + b) / 2 for a, b in zip(first["score_chatml"], rescored["score_zephyr"], strict=True)]
    )


def test_a_previous_output_is_replaced_only_with_overwrite(tiny_models, data, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert score(data, [tiny_models["zephyr"]], out, cache) == 0
    assert score(data, [tiny_models["zephyr"]], out, cache) == 2
    assert error_line(capsys) == (
        f"poft score: error: --output {out} holds a previous poft output. Pass --overwrite to replace it, or choose "
        "another --output."
    )
    (tmp_path / "file").write_text("x")
    assert score(data, [tiny_models["zephyr"]], tmp_path / "file", cache) == 2
    assert error_line(capsys).startswith(f"poft score: error: --output {tmp_path / 'file'} is an existing file")


# --------------------------------------------------------------------------- the score cache


def test_cache_path_of_the_wrong_kind(tiny_models, data, tmp_path, capsys):
    (tmp_path / "cachefile").write_text("x")
    assert score(data, [tiny_models["zephyr"]], tmp_path / "o", tmp_path / "cachefile") == 2
    assert error_line(capsys) == (
        f"poft score: error: --cache_dir {tmp_path / 'cachefile'} is a file; give a folder (or leave --cache_dir out)."
    )
    cache = tmp_path / "cache"
    ScoreCache(cache, "fp", {}).append([{"poft_id": "a", "score": -1.0, "n_tokens": 3}])
    (cache / "fp.shard0.jsonl").mkdir()
    with pytest.raises(CacheError, match=r"fp.shard0.jsonl is not a cache file \(a folder\?\). Delete it"):
        ScoreCache(cache, "fp", {}).load()


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b'{"poft_id": "a", "score": "high", "n_tokens": 3}\n', "wrong fields or types: poft_id str, score str"),
        (b'{"poft_id": 7, "score": -1.0, "n_tokens": 3}\n', "wrong fields or types: poft_id int"),
        (b"\x00\xff\xfe binary junk\n", "not JSON text"),
    ],
)
def test_corrupt_cache_lines_are_ignored_naming_the_file(tmp_path, line, problem, caplog):
    cache = ScoreCache(tmp_path, "fp", {})
    cache.append([{"poft_id": "ok", "score": -1.0, "n_tokens": 3}])
    with open(cache.path, "ab") as f:
        f.write(line)
    assert list(cache.load()) == ["ok"]
    assert f"{tmp_path / 'fp.jsonl'}: 1 of 2 lines are corrupt and ignored (first: line 2, {problem}" in caplog.text


def read_only(monkeypatch) -> None:
    """Writes to the score cache fail as on a read-only file system (tests may run as root, so chmod cannot)."""
    real_open = open

    def refusing_open(path, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wa+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    def refusing_write(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(score_cache, "open", refusing_open, raising=False)
    monkeypatch.setattr(score_cache, "atomic_write_text", refusing_write)


def test_read_only_cache_serves_what_it_holds_and_names_itself_when_more_is_needed(
    tiny_models, conversations, tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "cache"
    few = write_jsonl(tmp_path / "few.jsonl", conversations[:3])
    assert score(few, [tiny_models["zephyr"]], tmp_path / "first", cache) == 0
    read_only(monkeypatch)
    assert score(few, [tiny_models["zephyr"]], tmp_path / "again", cache) == 0
    assert load_from_disk(str(tmp_path / "again"))["ref_score"] == load_from_disk(str(tmp_path / "first"))["ref_score"]
    more = write_jsonl(tmp_path / "more.jsonl", conversations[:5])
    assert score(more, [tiny_models["zephyr"]], tmp_path / "more", cache) == 2
    line = error_line(capsys)
    assert line.startswith(f"poft score: error: cannot write the score cache file {cache}")
    assert "the file system is read-only (Errno 30)" in line and line.endswith(
        "Point --cache_dir to a writable folder (scores already cached there are read fine)."
    )


def test_an_older_line_without_entropy_never_hides_a_complete_one(tmp_path):
    """Cache files are read in name order and the last line of a row wins, except that a line without entropy (an
    older poft's, say in a shard file that sorts after the main file) never replaces a complete one."""
    main = ScoreCache(tmp_path, "fp", {})
    main.append([{"poft_id": "a", "score": -1.0, "n_tokens": 3, "entropy": 0.5}])
    older_shard = ScoreCache(tmp_path, "fp", {}, shard=0)
    older_shard.append(
        [{"poft_id": "a", "score": -1.0, "n_tokens": 3}, {"poft_id": "b", "score": -2.0, "n_tokens": 1}]
    )
    main.append([{"poft_id": "b", "score": -2.0, "n_tokens": 1, "entropy": 0.25}])
    entries = main.load()
    assert (entries["a"].entropy, entries["b"].entropy) == (0.5, 0.25) and entries["a"].complete


def test_a_read_only_cache_of_an_older_poft_serves_its_scores_without_entropy(
    tiny_models, conversations, small_disk, tmp_path, caplog
):
    """Cache lines written before poft cached entropies, on a real read-only disk: their scores are served as they
    are, with a null ref_entropy and one warning, where a writable cache would score them again."""
    cache = small_disk.path / "cache"
    config = ScoreConfig(cache_dir=str(cache), device="cpu")
    fresh = score_dataset(as_dataset(conversations[:4]), [tiny_models["zephyr"]], config)
    (cache_file,) = cache.glob("*.jsonl")
    lines = [json.loads(line) for line in cache_file.read_text().splitlines()]
    cache_file.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "entropy"}) + "\n" for r in lines))
    small_disk.read_only()
    with caplog.at_level(logging.WARNING, logger="poft"):
        served = score_dataset(as_dataset(conversations[:4]), [tiny_models["zephyr"]], config)
    assert served["score_zephyr"] == fresh["score_zephyr"] and served["ref_entropy"] == [None] * 4
    assert "4 cached scores lack the reference's entropy (cached by an older poft) and the cache is read-only" in (
        caplog.text
    )


def disk_full_open(path, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wa+"):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return open(path, mode, *args, **kwargs)


def test_full_disk_while_scoring_keeps_the_cache_and_leaves_no_output(
    tiny_models, data, tmp_path, monkeypatch, capsys
):
    real_append = ScoreCache.append

    def append_then_fill_the_disk(self, records):
        real_append(self, records)
        monkeypatch.setattr(score_cache, "open", disk_full_open, raising=False)

    monkeypatch.setattr(ScoreCache, "append", append_then_fill_the_disk)
    cache = tmp_path / "cache"
    assert score(data, [tiny_models["zephyr"]], tmp_path / "out", cache, "--batch_tokens", "64") == 2
    line = error_line(capsys)
    assert line.startswith(f"poft score: error: cannot write the score cache file {cache}")
    assert line.endswith(
        "the disk is full (Errno 28). Free space or pick a writable location, then rerun. Scores "
        "cached so far are kept; rerun to resume."
    )
    assert 0 < len(cached_values(cache)) < 4  # the first batch is kept for the resumed run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "chats.jsonl"]  # no output, no temporary folder


def test_full_disk_in_cache_append_is_one_line(tmp_path, monkeypatch):
    cache = ScoreCache(tmp_path / "cache", "fp", {})

    monkeypatch.setattr(score_cache, "open", disk_full_open, raising=False)
    with pytest.raises(CacheError, match=r"the disk is full \(Errno 28\).*Scores cached so far are kept; rerun"):
        cache.append([{"poft_id": "a", "score": -1.0, "n_tokens": 2}])


# --------------------------------------------------------------------------- filter, train, report, eval


def scored_set(tmp_path: Path, values: list) -> str:
    rows = [
        {
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "ref_score": v,
            "ref_entropy": 1.0,
        }
        for i, v in enumerate(values)
    ]
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_filter_keeping_nothing_is_an_error_and_keeping_little_a_warning(tmp_path, capsys, caplog):
    data = scored_set(tmp_path, [-1.0 - i for i in range(200)])
    assert main(["filter", "--data", data, "--output", str(tmp_path / "none"), "--threshold", "100"]) == 2
    assert error_line(capsys) == (
        "poft filter: error: ref_score >= 100 keeps none of the 200 rows (the highest eligible score is -1); nothing "
        "was written. Lower --threshold or raise --top_fraction."
    )
    assert not (tmp_path / "none").exists()
    assert main(["filter", "--data", data, "--output", str(tmp_path / "one"), "--threshold", "-1"]) == 0
    assert any("keeps only 1 of 200 rows (under 1%)" in r.getMessage() for r in caplog.records)


def test_filter_by_a_non_numeric_column(tmp_path, capsys):
    data = scored_set(tmp_path, ["good", "bad"])
    assert main(["filter", "--data", data, "--output", str(tmp_path / "o"), "--top_fraction", "0.5"]) == 2
    assert error_line(capsys) == (
        "poft filter: error: The column 'ref_score' holds string values, not numbers, so it cannot rank rows. Filter "
        "by a score column (--by ref_score, --by score_<name>) or convert the column to numbers."
    )


def train(data: str, model: str, output: Path, *extra: str) -> int:
    argv = ["train", "--dataset_name", data, "--model_name_or_path", model, "--output_dir", str(output)]
    return main(argv + ["--max_steps", "1", "--report_to", "none", "--save_strategy", "no", *extra])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            ["high", "low"],
            "The 'ref_score' column of the train dataset holds string values, not numbers. Give it the float scores",
        ),
        ([None, None], "Every 'ref_score' of the train dataset is null (no reference could score any row), so PoFT"),
    ],
)
def test_train_refuses_string_or_all_null_reference_scores(tiny_models, tmp_path, capsys, values, expected):
    assert train(scored_set(tmp_path, values), tiny_models["chatml"], tmp_path / "run") == 2
    assert error_line(capsys).startswith(f"poft train: error: {expected}")


def test_train_with_every_response_truncated_away(tiny_models, tmp_path, capsys):
    data = scored_set(tmp_path, [-1.0, -2.0])
    assert train(data, tiny_models["chatml"], tmp_path / "run", "--max_length", "3") == 2
    assert error_line(capsys).startswith(
        "poft train: error: None of the 2 conversations of the train dataset has a response token left after "
        "truncation to 3 tokens"
    )


@pytest.mark.parametrize("beta", ["0", "-1"])
def test_train_refuses_beta_that_is_not_positive(tiny_models, tmp_path, capsys, beta):
    assert train(scored_set(tmp_path, [-1.0]), tiny_models["chatml"], tmp_path / "run", "--beta", beta) == 2
    assert error_line(capsys) == f"poft train: error: --beta must be positive (the paper uses 1), got {float(beta)}"


def test_train_with_a_missing_model(tmp_path, capsys):
    assert train(scored_set(tmp_path, [-1.0]), "./no/such/model", tmp_path / "run") == 2
    assert error_line(capsys) == (
        "poft train: error: --model_name_or_path ./no/such/model: no such model folder. Check the path (hub ids look "
        "like org/name)."
    )


def test_read_only_output_folders(tiny_models, data, tmp_path, monkeypatch, capsys):
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert score(data, [tiny_models["zephyr"]], tmp_path / "out", tmp_path / "cache") == 2
    assert error_line(capsys) == (
        f"poft score: error: cannot write --output {tmp_path / 'out'}: the file system is read-only (Errno 30). "
        "Free space or pick a writable location, then rerun."
    )
    assert train(scored_set(tmp_path, [-1.0]), tiny_models["chatml"], tmp_path / "run") == 2
    assert error_line(capsys) == (
        f"poft train: error: cannot write --output_dir {tmp_path / 'run'}: the file system is read-only (Errno 30). "
        "Free space or pick a writable location, then rerun."
    )


def test_full_disk_while_checkpointing_removes_the_partial_checkpoint(tiny_models, tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    def full_disk_checkpoint(self, model, trial):
        partial = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        partial.mkdir(parents=True)
        (partial / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_save_checkpoint", full_disk_checkpoint)
    run = tmp_path / "run"
    assert (
        train(
            scored_set(tmp_path, [-1.0, -2.0]),
            tiny_models["chatml"],
            run,
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
        )
        == 2
    )
    assert error_line(capsys) == (
        f"poft train: error: cannot write checkpoints or the model to {run}: the disk is full (Errno 28). Free space "
        f"or pick a writable location, then rerun. Complete checkpoints in {run} are kept: resume with "
        "--resume_from_checkpoint true."
    )
    assert not list(run.glob("checkpoint-*"))


def test_report_on_nan_and_all_null_scores(tmp_path):
    scored = Dataset.from_dict(
        {
            "messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 3,
            "score_a": [math.nan, -1.0, -2.0],
            "score_b": [None, None, None],
            "ref_score": [math.nan, math.inf, None],
        }
    )
    scored.save_to_disk(str(tmp_path / "scored"))
    assert main(["report", "--scored", str(tmp_path / "scored"), "--output", str(tmp_path / "r")]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| score_a | -1.500 | 0.500 | -2.000 | -1.000 | 1 |" in report
    assert "| score_b | - | - | - | - | 3 (no finite score) |" in report
    assert "| ref_score | - | - | - | - | 3 (no finite score) |" in report


def test_eval_of_hub_tasks_while_offline(tiny_models, tmp_path, monkeypatch, capsys):
    import lm_eval
    import lm_eval.tasks

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    class Tasks:  # lm-eval's index of every task takes seconds to build; one known name is enough here
        all_tasks = ["arc_easy"]

        def __init__(self, include_path=None):
            pass

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Tasks)
    argv = ["eval", "--model", tiny_models["chatml"], "--tasks", "arc_easy:0", "--output", str(tmp_path / "e")]
    assert main(argv + ["--device", "cpu", "--limit", "2"]) == 2
    assert error_line(capsys) == (
        "poft eval: error: lm-eval task arc_easy: its data could not be downloaded (Couldn't reach 'allenai/ai2_arc' "
        "on the Hub (LocalEntryNotFoundError)). Connect to the network once so the data lands in the Hugging Face "
        "cache, use a local task YAML (--task_dir DIR), or evaluate --data alone (--tasks none)."
    )


# --------------------------------------------------------------------------- ours vs bugs


def test_only_poft_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    def bug():
        raise ValueError("an internal bug")

    def user_error():
        raise ScoringError("a user can fix this")

    monkeypatch.setattr(cli, "parse", lambda name, argv: ())
    monkeypatch.setattr(cli.Command, "load", lambda self, name: bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["report"])
    monkeypatch.setattr(cli.Command, "load", lambda self, name: user_error)
    assert main(["report"]) == 2
    assert error_line(capsys) == "poft report: error: a user can fix this"


def test_noise_drops_the_scores_of_the_responses_it_changes(tiny_models, data, tmp_path, caplog):
    assert score(data, [tiny_models["zephyr"]], tmp_path / "scored", tmp_path / "cache") == 0
    assert main(["noise", "--data", str(tmp_path / "scored"), "--output", str(tmp_path / "noised")]) == 0
    noised = load_from_disk(str(tmp_path / "noised"))
    content = ["score_zephyr", "n_tokens_zephyr", "entropy_zephyr", "ref_score", "ref_entropy"]
    assert not set(content) & set(noised.column_names)
    assert any(f"Dropped {', '.join(content)}" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "noised" / "poft_output.json").read_text())["columns"] == ["poft_noise"]


# --------------------------------------------------------------------------- columns poft did not write


def rows_with(tmp_path: Path, name: str, **columns) -> str:
    """A JSONL file of 8 conversations with extra columns (one value per row)."""
    from tests.conftest import make_conversations

    rows = [{"messages": m, **{k: v[i] for k, v in columns.items()}} for i, m in enumerate(make_conversations(8))]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_filter_refuses_a_users_poft_filters_column(tmp_path, capsys):
    data = rows_with(tmp_path, "d.jsonl", ref_score=[-float(i) for i in range(8)], poft_filters=["mine"] * 8)
    argv = ["filter", "--data", data, "--top_fraction", "0.5", "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    assert error_line(capsys).startswith(
        f"poft filter: error: {data}: the column 'poft_filters' is not one poft wrote, and this run would replace it."
    )
    assert main([*argv, "--overwrite"]) == 0
    assert load_from_disk(str(tmp_path / "out"))["poft_filters"] == [["ref_score top 0.5 (kept score >= -3)"]] * 4


def test_filter_ifd_refuses_a_users_ifd_column(tiny_models, tmp_path, capsys):
    data = rows_with(tmp_path, "d.jsonl", ifd=[0.5] * 8)
    argv = ["filter", "--data", data, "--ifd_model", tiny_models["chatml"], "--top_fraction", "0.5"]
    argv += ["--output", str(tmp_path / "out"), "--device", "cpu", "--cache_dir", str(tmp_path / "c")]
    assert main(argv) == 2
    assert error_line(capsys).startswith(f"poft filter: error: {data}: the column 'ifd' is not one poft wrote")


def test_noise_refuses_a_users_poft_noise_column_and_ors_its_own(tmp_path, capsys):
    data = rows_with(tmp_path, "d.jsonl", poft_noise=["no"] * 8)
    assert main(["noise", "--data", data, "--rate", "0.25", "--output", str(tmp_path / "n")]) == 2
    assert error_line(capsys).startswith(f"poft noise: error: {data}: the column 'poft_noise' is not one poft wrote")
    clean = rows_with(tmp_path, "clean.jsonl")
    assert main(["noise", "--data", clean, "--rate", "0.25", "--output", str(tmp_path / "n1")]) == 0
    argv = ["noise", "--data", str(tmp_path / "n1"), "--rate", "0.25", "--seed", "7", "--output", str(tmp_path / "n2")]
    assert main(argv) == 0
    first, second = load_from_disk(str(tmp_path / "n1")), load_from_disk(str(tmp_path / "n2"))
    fresh = [a != b for a, b in zip(first["messages"], second["messages"], strict=True)]
    assert second["poft_noise"] == [a or b for a, b in zip(first["poft_noise"], fresh, strict=True)]
    assert sum(second["poft_noise"]) > sum(first["poft_noise"])


# --------------------------------------------------------------------------- poft report's inputs


def report(tmp_path: Path, *args: str, output: str = "r") -> int:
    return main(["report", *args, "--output", str(tmp_path / output)])


def test_report_on_string_score_columns(tmp_path, capsys):
    rows = {"messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 3}
    Dataset.from_dict({**rows, "ref_score": ["high", "low", "low"]}).save_to_disk(str(tmp_path / "scored"))
    assert report(tmp_path, "--scored", str(tmp_path / "scored")) == 2
    assert error_line(capsys) == (
        f"poft report: error: --scored {tmp_path / 'scored'}: the column 'ref_score' holds string values, not "
        "numbers. Give the output of `poft score`, or rename the column."
    )
    assert not (tmp_path / "r").exists()  # nothing written before every input was read


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file. Give the eval_results.json that `poft eval` writes."),
        ("{not json", "is not valid JSON (Expecting property name"),
        ('{"a": 1}', "has no 'results' object (model -> task -> metric)."),
    ],
)
def test_report_on_a_bad_eval_file(tmp_path, capsys, content, expected):
    path = tmp_path / "eval_results.json"
    if content is not None:
        path.write_text(content)
    assert report(tmp_path, "--eval", str(path)) == 2
    line = error_line(capsys)
    assert line.startswith(f"poft report: error: --eval {path}") and expected in line


def test_report_on_a_corrupt_trainer_state(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text('{"log_history": [{"loss": 1.0')
    assert report(tmp_path, "--runs", str(tmp_path / "run")) == 2
    assert error_line(capsys).startswith(
        f"poft report: error: --runs {tmp_path / 'run' / 'trainer_state.json'} is not valid JSON ("
    )


def test_report_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "r").write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text('{"log_history": [{"loss": 1.0, "step": 1}]}')
    assert report(tmp_path, "--runs", str(tmp_path / "run")) == 2
    assert error_line(capsys) == (
        f"poft report: error: --output {tmp_path / 'r'} is an existing file; poft report writes a folder there "
        "(report.md, report.html, plots). Choose another --output."
    )
    assert (tmp_path / "r").read_text() == "mine"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("data: [a\nfoo: : bar\n", "is not valid YAML (expected ',' or ']', but got ':' at line 2, column 4)."),
        (None, "is a folder; give a YAML file."),
    ],
)
def test_config_that_is_not_a_yaml_file(tmp_path, capsys, content, expected):
    path = tmp_path / "recipe.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    assert main(["score", "--config", str(path)]) == 2
    assert error_line(capsys).startswith(f"poft score: error: --config {path} {expected}")


@pytest.mark.parametrize("command", ["train", "dpo"])
def test_training_a_hub_model_while_offline(tmp_path, monkeypatch, capsys, command):
    """from_pretrained's OSError becomes one line, and the output folder this run created is not left behind."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data = tmp_path / "d.jsonl"
    row = (
        {"prompt": "hi", "chosen": "yes", "rejected": "no"}
        if command == "dpo"
        else {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "ref_score": -1.0,
        }
    )
    data.write_text(json.dumps(row) + "\n")
    argv = [command, "--dataset_name", str(data), "--model_name_or_path", "poft-tests/no-such-model"]
    assert main([*argv, "--output_dir", str(tmp_path / "run"), "--report_to", "none"]) == 2
    assert error_line(capsys).startswith(
        f"poft {command}: error: Cannot load --model_name_or_path poft-tests/no-such-model: "
    )
    assert not (tmp_path / "run").exists()


def test_corrupt_filter_summary_in_the_input(tiny_models, tmp_path, capsys):
    from tests.conftest import as_dataset, make_conversations

    source = tmp_path / "filtered"
    as_dataset(make_conversations(4), ref_score=[-1.0, -2.0, -3.0, -4.0]).save_to_disk(str(source))
    (source / "filter_summary.json").write_text('[{"filter": ')
    expected = f"{source / 'filter_summary.json'} is not valid JSON ("
    fix = "Fix or delete it: it only records what earlier `poft filter` runs kept."
    argv = ["filter", "--data", str(source), "--top_fraction", "0.5", "--output", str(tmp_path / "f")]
    assert main(argv) == 2
    line = error_line(capsys)
    assert line.startswith(f"poft filter: error: {expected}") and line.endswith(fix)
    assert score(str(source), [tiny_models["chatml"]], tmp_path / "s", tmp_path / "c") == 2
    line = error_line(capsys)
    assert line.startswith(f"poft score: error: {expected}") and line.endswith(fix)
    assert not (tmp_path / "f").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", ["noise", "filter"])
def test_noise_and_filter_skip_invalid_rows_into_a_report(tmp_path, capsys, command):
    from tests.conftest import make_conversations

    rows = [{"messages": m, "ref_score": -float(i)} for i, m in enumerate(make_conversations(8))]
    rows.insert(2, {"messages": [{"role": "bot", "content": "x"}], "ref_score": 0.0})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = ["--rate", "0.5"] if command == "noise" else ["--top_fraction", "0.5"]
    argv = [command, "--data", str(data), *options]
    assert main([*argv, "--output", str(tmp_path / "o")]) == 2
    assert "d.jsonl: line 3" in error_line(capsys) and not (tmp_path / "o").exists()
    assert main([*argv, "--output", str(tmp_path / "o2"), "--skip-invalid"]) == 0
    report = [json.loads(line) for line in (tmp_path / "o2" / "invalid_rows.jsonl").read_text().splitlines()]
    assert [r["line"] for r in report] == [3] and report[0]["record"] == rows[2]
    assert len(load_from_disk(str(tmp_path / "o2"))) == (8 if command == "noise" else 4)


def test_noise_rate_that_corrupts_no_row(tmp_path, capsys):
    from tests.conftest import make_conversations

    data = write_jsonl(tmp_path / "d.jsonl", make_conversations(24))
    assert main(["noise", "--data", data, "--rate", "0.01", "--output", str(tmp_path / "n")]) == 2
    assert error_line(capsys) == (
        "poft noise: error: --rate 0.01 corrupts none of the 24 rows (0.01 x 24 rounds to 0); use --rate 0.04167 or "
        "more to corrupt at least one row."
    )
    assert main(["noise", "--data", data, "--rate", str(1 / 24), "--output", str(tmp_path / "n")]) == 0
    assert sum(load_from_disk(str(tmp_path / "n"))["poft_noise"]) == 1


def test_a_copy_of_a_reference_is_the_same_reference(tiny_models, data, tmp_path, capsys):
    """Weights are identified by content: a copy (new mtime, another folder) is refused as a second reference."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_models["zephyr"], copy, copy_function=shutil.copyfile)  # fresh mtimes
    assert score(data, [tiny_models["zephyr"], str(copy)], tmp_path / "out", tmp_path / "cache") == 2
    assert error_line(capsys).startswith(f"poft score: error: --model {copy} is the same model as --model ")
    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 1  # same size, same header: another checkpoint of one architecture
    save_file(tensors, weights, metadata={"format": "pt"})
    assert score_cache.model_fingerprint(str(copy)) != score_cache.model_fingerprint(tiny_models["zephyr"])


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--dtype", "float8", "--dtype must be auto, float32, bfloat16 or float16, got 'float8'"),
        ("--device", "tpu9", "--device 'tpu9' is not a device; use auto, cpu, cuda, cuda:N or mps."),
    ],
)
@pytest.mark.parametrize("command", ["score", "filter", "eval"])
def test_bad_dtype_or_device_fails_before_the_data_is_read(
    tmp_path, capsys, monkeypatch, command, option, value, expected
):
    import poft.data

    def never(*args, **kwargs):
        raise AssertionError("the data was read before the options were checked")

    monkeypatch.setattr(poft.data, "load_sft_dataset", never)
    argv = {
        "score": ["--data", "d.jsonl", "--model", "m", "--output", str(tmp_path / "o")],
        "filter": ["--data", "d.jsonl", "--ifd_model", "m", "--top_fraction", "0.5", "--output", str(tmp_path / "o")],
        "eval": ["--data", "d.jsonl", "--model", "m", "--tasks", "none"],
    }[command]
    assert main([command, *argv, option, value]) == 2
    assert error_line(capsys) == f"poft {command}: error: {expected}"


def test_quickstart_refuses_a_foreign_folder_and_accepts_its_own(tmp_path, capsys):
    from poft.demo.quickstart import check_quickstart_output

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["quickstart", "--output", str(foreign)]) == 2
    assert "is a non-empty folder that is not a quickstart output" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    earlier = tmp_path / "earlier"
    (earlier / "scored").mkdir(parents=True)
    (earlier / "scored" / "poft_output.json").write_text("{}")
    check_quickstart_output(earlier)
    check_quickstart_output(tmp_path / "new")
