"""The reference check: its statistics against numpy and scipy, its verdict, and its line in `poft score`'s log and in
`poft report`."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from poft.cli import main
from poft.reference_check import CONFIDENT, check_references, quantile, spearman
from tests.conftest import as_dataset, make_conversations, write_jsonl


def test_quantile_and_spearman_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    values = rng.normal(size=37).tolist()
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert quantile(values, q) == pytest.approx(np.quantile(values, q))
    x = rng.integers(0, 5, size=50).tolist()  # ties
    y = [a + b for a, b in zip(x, rng.normal(size=50), strict=True)]
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert math.isnan(spearman([1.0, 1.0], [1.0, 2.0]))


def test_check_by_hand():
    # ref_score 90th percentile of [-3, -2, -1, -0.5, -0.1]: position 3.6, -0.5 + 0.6 * 0.4 = -0.26
    columns = {
        "ref_score": [-3.0, -2.0, -1.0, -0.5, -0.1, None],
        "score_a": [-3.0, -2.0, -1.0, -0.5, -0.1, None],
        "score_b": [-0.1, -0.5, -1.0, -2.0, -3.0, None],  # the reverse order: Spearman -1
        "n_tokens_a": [1, 1, 1, 1, 1, 0],
    }
    check = check_references(columns)
    assert check.rows == 5
    assert check.top_confidence == pytest.approx(math.exp(-0.26))
    assert check.agreement == pytest.approx(-1.0)
    assert not check.weak and "0.77" in check.line() and "agreement between references -1.00" in check.line()
    weak = check_references({"ref_score": [-2.0, -1.5, -1.0]})
    assert weak.weak and weak.agreement is None and f"below {CONFIDENT:g}" in weak.line()
    assert check_references({"ref_score": [None, -1.0]}) is None


def test_score_logs_the_check_and_report_shows_it(tiny_models, conversations, tmp_path, caplog):
    data = write_jsonl(tmp_path / "chats.jsonl", conversations)
    with caplog.at_level(logging.INFO):
        code = main(
            [
                "score",
                *("--data", data, "--model", tiny_models["chatml"], "--model", tiny_models["zephyr"]),
                *("--output", str(tmp_path / "scored"), "--device", "cpu", "--cache-dir", str(tmp_path / "c")),
            ]
        )
    assert code == 0
    (line,) = [r for r in caplog.records if r.getMessage().startswith("Reference check:")]
    assert line.levelno == logging.WARNING  # untrained tiny models are far from confident

    n = 20
    scores = [-0.01 * i for i in range(n)]
    as_dataset(make_conversations(n), score_a=scores, score_b=scores, ref_score=scores).save_to_disk(
        str(tmp_path / "good")
    )
    assert main(["report", "--scored", str(tmp_path / "good"), "--output", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    expected = check_references({"ref_score": scores, "score_a": scores, "score_b": scores}).line()
    assert expected in report and "rank agreement between references 1.00" in expected
