"""Score filtering and IFD: fractions and thresholds by hand, IFD against a slow computation, composition."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft.chat import ChatTemplateError, ConversationEncoder
from poft.cli import main
from poft.filtering import FilterConfig, filter_by_score, ifd_scores, response_only
from poft.scoring import ScoreConfig
from tests.conftest import as_dataset, make_conversations, write_jsonl


def test_top_fraction_and_threshold_by_hand():
    scores = [0.5, None, -1.0, 2.0, float("nan"), 0.7, -0.2, 1.1]
    data = as_dataset(make_conversations(8), ref_score=scores)
    kept, summary = filter_by_score(data, "ref_score", top_fraction=0.3)
    assert kept["ref_score"] == [2.0, 0.7, 1.1]  # ceil(0.3 * 8) = 3 rows, in their original order
    assert summary == {
        "filter": "ref_score top 0.3",
        "rows_in": 8,
        "rows_kept": 3,
        "dropped_missing_score": 2,
        "dropped_by_rule": 3,
        "kept_min_score": 0.7,
    }
    kept, summary = filter_by_score(data, "ref_score", top_fraction=0.4)
    assert kept["ref_score"] == [0.5, 2.0, 0.7, 1.1]
    kept, _ = filter_by_score(data, "ref_score", threshold=0.0)
    assert kept["ref_score"] == [0.5, 2.0, 0.7, 1.1]
    kept, _ = filter_by_score(data, "ref_score", top_fraction=1.0, drop_at_or_above=1.0)
    assert kept["ref_score"] == [0.5, -1.0, 0.7, -0.2]


def test_filters_compose_and_record_why():
    data = as_dataset(
        make_conversations(10), ref_score=[float(i) for i in range(10)], other=[float(-i) for i in range(10)]
    )
    first, _ = filter_by_score(data, "ref_score", top_fraction=0.8)
    second, _ = filter_by_score(first, "other", top_fraction=0.5)
    assert second["ref_score"] == [2.0, 3.0, 4.0, 5.0]
    assert second["poft_filters"][0] == ["ref_score top 0.8 (kept score >= 2)", "other top 0.5 (kept score >= -5)"]


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.2])
def test_bad_fraction_names_the_fix(fraction):
    with pytest.raises(ValueError, match=r"--top_fraction must be in \(0, 1\]"):
        FilterConfig(data="d", output="o", top_fraction=fraction)
    with pytest.raises(ValueError, match="Say what to keep"):
        FilterConfig(data="d", output="o")


def test_missing_score_column_names_the_fix():
    with pytest.raises(ValueError, match="no 'ref_score' column.*poft score"):
        filter_by_score(as_dataset(make_conversations(3)), "ref_score", top_fraction=0.5)


def slow_mean_cross_entropy(model, tokenizer, messages) -> float:
    encoded = ConversationEncoder(tokenizer).encode(messages)
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    return nll[torch.tensor(encoded.response_mask[1:], dtype=torch.bool)].mean().item()


def test_ifd_equals_slow_ratio_of_cross_entropies(tiny_models, tmp_path):
    conversations = make_conversations(6, seed=9)
    values = ifd_scores(
        as_dataset(conversations), tiny_models["chatml"], ScoreConfig(cache_dir=str(tmp_path), device="cpu")
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_models["chatml"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["chatml"])
    for messages, value in zip(conversations, values, strict=False):
        with_prompt = slow_mean_cross_entropy(model, tokenizer, messages)
        # IFD's unconditional conversation, built by hand: each answer after an empty user turn
        answers_alone = [t for m in messages if m["role"] == "assistant" for t in ({"role": "user", "content": ""}, m)]
        without = slow_mean_cross_entropy(model, tokenizer, answers_alone)
        assert value == pytest.approx(with_prompt / without, rel=1e-5)


def test_response_only_puts_an_empty_user_turn_before_each_answer():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    empty = {"role": "user", "content": ""}
    assert response_only(messages) == [empty, messages[2], empty, messages[4]]


def test_ifd_with_a_template_that_requires_alternating_roles(template_models, tmp_path):
    """Gemma's template raises on two assistant turns in a row; IFD's unconditional pass must still render."""
    model = template_models["gemma"]
    conversations = make_conversations(4, seed=5)
    values = ifd_scores(as_dataset(conversations), model, ScoreConfig(cache_dir=str(tmp_path), device="cpu"))
    ref = AutoModelForCausalLM.from_pretrained(model).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    for messages, value in zip(conversations, values, strict=True):
        answers_alone = [t for m in messages if m["role"] == "assistant" for t in ({"role": "user", "content": ""}, m)]
        expected = slow_mean_cross_entropy(ref, tokenizer, messages) / slow_mean_cross_entropy(
            ref, tokenizer, answers_alone
        )
        assert value == pytest.approx(expected, rel=1e-5)


def test_ifd_error_names_the_users_row(tiny_models, tmp_path):
    """A template that fails only on the response-only conversation names the row it was made from."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["chatml"])
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['content'] == '' %}{{ raise_exception('empty turn') }}{% endif %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_models["chatml"])
    path = tmp_path / "strict"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with pytest.raises(
        ChatTemplateError, match=r"^reference 'strict', the response-only copy \(IFD\) of conversation 1 "
    ):
        ifd_scores(as_dataset(make_conversations(3)), str(path), ScoreConfig(cache_dir=str(tmp_path), device="cpu"))


def test_cli_ifd_then_score_filter(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_conversations(20, seed=4))
    common = ["--device", "cpu", "--cache_dir", str(tmp_path / "c")]
    assert (
        main(
            [
                "filter",
                "--data",
                data,
                "--ifd_model",
                tiny_models["chatml"],
                "--top_fraction",
                "0.8",
                "--output",
                str(tmp_path / "ifd"),
                *common,
            ]
        )
        == 0
    )
    ifd = load_from_disk(str(tmp_path / "ifd"))
    assert 0 < len(ifd) <= 16 and all(v < 1 for v in ifd["ifd"])
    assert (
        main(
            [
                "score",
                "--data",
                str(tmp_path / "ifd"),
                "--model",
                tiny_models["zephyr"],
                "--output",
                str(tmp_path / "scored"),
                *common,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "filter",
                "--data",
                str(tmp_path / "scored"),
                "--by",
                "ref_score",
                "--top_fraction",
                "0.4",
                "--output",
                str(tmp_path / "top"),
            ]
        )
        == 0
    )
    top = load_from_disk(str(tmp_path / "top"))
    assert len(top) == math.ceil(0.4 * len(ifd)) and all(len(f) == 2 for f in top["poft_filters"])
    assert (
        min(top["ref_score"])
        >= sorted(load_from_disk(str(tmp_path / "scored"))["ref_score"], reverse=True)[len(top) - 1]
    )
    history = json.loads((tmp_path / "top" / "filter_summary.json").read_text())
    assert [h["filter"] for h in history] == ["ifd top 0.8 and < 1", "ref_score top 0.4"]
    printed = json.loads(capsys.readouterr().out)  # the command prints its summary
    assert printed == {k: v for k, v in history[-1].items() if k not in ("source", "config")}
    assert (
        main(
            [
                "filter",
                "--data",
                str(tmp_path / "scored"),
                "--by",
                "nope",
                "--top_fraction",
                "0.4",
                "--output",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
