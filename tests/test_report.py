"""poft report: agreement statistics against numpy, the eval table by hand, and a report over everything."""

from __future__ import annotations

import json

import numpy as np

from poft.cli import main
from poft.report import agreement_table, eval_table
from tests.conftest import as_dataset, make_conversations


def test_agreement_is_pearson_and_spearman():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = a + rng.normal(scale=0.5, size=50)
    table = agreement_table({"a": list(a), "b": list(b)})
    pearson = np.corrcoef(a, b)[0, 1]
    spearman = np.corrcoef(a.argsort().argsort(), b.argsort().argsort())[0, 1]
    assert f"| a | 1.000 / 1.000 | {pearson:.3f} / {spearman:.3f} |" in table


def test_eval_table_puts_models_side_by_side():
    table = eval_table(
        [{"results": {"m1": {"arc": {"acc": 0.5}}}}, {"results": {"m2": {"arc": {"acc": 0.25}, "gsm8k": {"em": 0.1}}}}]
    )
    assert table.splitlines() == [
        "| task | metric | m1 | m2 |",
        "| --- | --- | --- | --- |",
        "| arc | acc | 0.5000 | 0.2500 |",
        "| gsm8k | em | - | 0.1000 |",
    ]


def test_report_over_scores_runs_and_evals(tmp_path):
    n = 40
    rng = np.random.default_rng(1)
    noisy = [i % 4 == 0 for i in range(n)]
    a = [float(x) - 3 * z for x, z in zip(rng.normal(size=n), noisy, strict=False)]
    b = [x + 0.1 for x in a]
    data = as_dataset(
        make_conversations(n),
        score_a=a,
        score_b=b,
        ref_score=[(x + y) / 2 for x, y in zip(a, b, strict=False)],
        poft_noise=noisy,
    )
    data.save_to_disk(str(tmp_path / "scored"))
    run = tmp_path / "run"
    run.mkdir()
    history = [
        {"step": s, "loss": 1.0 / s, "poft/weight": 0.5, "poft/win_rate": 0.4, "poft/margin": -0.1}
        for s in range(1, 6)
    ]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history + [{"step": 5, "train_runtime": 1.0}]}))
    (tmp_path / "ev.json").write_text(json.dumps({"results": {"m": {"arc": {"acc": 0.3}}}}))
    code = main(
        [
            "report",
            "--scored",
            str(tmp_path / "scored"),
            "--runs",
            str(run),
            "--eval",
            str(tmp_path / "ev.json"),
            "--output",
            str(tmp_path / "rep"),
        ]
    )
    assert code == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    for text in (
        "## Reference scores",
        "| score_a |",
        "AUC clean > noisy",
        "## Training",
        "| run | 5 | 0.2000 | 0.5000 | 0.4000 | -0.1000 |",
        "| arc | acc | 0.3000 |",
    ):
        assert text in report, text
    assert (tmp_path / "rep" / "score_distributions.png").stat().st_size > 0
    assert (tmp_path / "rep" / "training_curves.png").stat().st_size > 0
    assert main(["report", "--output", str(tmp_path / "x")]) == 2
    assert main(["report", "--runs", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2


def test_scored_report_needs_score_columns(tmp_path):
    as_dataset(make_conversations(1)).save_to_disk(str(tmp_path / "d"))
    assert main(["report", "--scored", str(tmp_path / "d"), "--output", str(tmp_path / "o")]) == 2
