"""poft report: agreement statistics against numpy, the eval table by hand, a report over everything, and
report.html: parsed, its images the plot files, nothing external, data rows inert."""

from __future__ import annotations

import base64
import itertools
import json
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from poft.cli import main
from poft.report import agreement_table, eval_table
from poft.report_html import escape_markdown, render_html
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


def test_report_over_scores_runs_and_evals(tmp_path, capsys):
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
    assert (
        capsys.readouterr().out == f"Wrote {tmp_path / 'rep' / 'report.md'} and {tmp_path / 'rep' / 'report.html'}\n"
    )
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


class _Page(HTMLParser):
    """Every start tag with its attributes, and the text of <td> cells."""

    def __init__(self):
        super().__init__()
        self.tags, self.cells, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td":
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_page(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


NASTY = [
    "a|b",
    "\\|",
    "ends in \\",
    "*x* _y_ `z` ~~s~~",
    "[a](http://e.example) ![i](x.png) <http://e.example>",
    "<b>&amp; &#60;</b>",
    "1. # not a heading\n\n- nor a list",
]


@pytest.mark.parametrize("text", NASTY)
def test_escaped_markdown_renders_as_the_literal_text(text, tmp_path):
    page = parse_page(render_html(f"| h |\n| --- |\n| {escape_markdown(text)} |\n", tmp_path, "t"))
    assert page.cells == [" ".join(text.split())]
    assert [tag for tag, _ in page.tags if tag not in ("html", "head", "meta", "title", "style", "body")] == [
        "table",
        "thead",
        "tr",
        "th",
        "tbody",
        "tr",
        "td",
    ]


def test_html_keeps_raw_html_and_foreign_links_inert(tmp_path):
    (tmp_path / "plot.png").write_bytes(b"\x89PNG not really")
    markdown = (
        "<script>alert(1)</script>\n\n<a href='http://e.example'>a</a> [b](http://e.example) <http://e.example> "
        "![c](http://e.example/c.png) ![d](../d.png) ![plot](plot.png)\n"
    )
    page = parse_page(render_html(markdown, tmp_path, "t"))
    body = [(tag, attrs) for tag, attrs in page.tags if tag not in ("html", "head", "meta", "title", "style", "body")]
    assert body == [
        ("p", {}),
        ("p", {}),
        ("img", {"src": "data:image/png;base64,iVBORyBub3QgcmVhbGx5", "alt": "plot"}),
    ]


def test_report_audit_lists_true_extremes_and_html_is_self_contained(tmp_path):
    n = 30
    conversations = make_conversations(n)
    attack = '<script>alert("x")</script> [click](http://evil.example/) <img src=http://e.example/i.png> | *a* &amp;'
    next(m for m in conversations[4] if m["role"] == "assistant")["content"] = attack
    rng = np.random.default_rng(3)
    a = [round(float(x), 1) for x in rng.normal(-1, 1, size=n)]  # rounded: ties
    b = [2 * x - 1 + float(e) for x, e in zip(a, rng.normal(0, 1, size=n), strict=True)]
    a[4], b[4], a[9] = -9.0, -20.0, None  # the row holding the attack is listed among the lowest
    ref = [None if x is None else (x + y) / 2 for x, y in zip(a, b, strict=True)]
    as_dataset(conversations, score_a=a, score_b=b, ref_score=ref).save_to_disk(str(tmp_path / "scored"))
    out = tmp_path / "rep"
    k = 5
    assert main(["report", "--scored", str(tmp_path / "scored"), "--output", str(out), "--audit_rows", str(k)]) == 0

    report = (out / "report.md").read_text()

    def listed(heading: str) -> list[int]:
        """Row indices of the first table after `heading`."""
        lines = report.split(heading, 1)[1].splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("|"))
        table = itertools.takewhile(lambda line: line.startswith("|"), lines[start + 2 :])
        return [int(line.split("|")[1]) for line in table]

    series = pd.Series(ref, dtype=float)
    assert listed("### Lowest ref_score") == list(series.dropna().nsmallest(k, keep="first").index)
    assert listed("### Highest ref_score") == list(series.dropna().nlargest(k, keep="first").index)
    assert listed("### Rows without a ref_score") == [9]
    assert "| -2.303 | 0.1 |" in report

    page = parse_page((out / "report.html").read_text())
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 1  # the score plot; the data row's link and <img> stay text
    assert (
        base64.b64decode(images[0].removeprefix("data:image/png;base64,"))
        == (out / "score_distributions.png").read_bytes()
    )
    assert not [tag for tag, _ in page.tags if tag in ("script", "link", "a", "iframe", "object")]
    assert not [
        value
        for _, attrs in page.tags
        for key, value in attrs.items()
        if key in ("src", "href") and value != images[0]
    ]
    assert attack in page.cells  # shorter than --audit_text_chars: the whole reply, literally
    assert "<script>" not in (out / "report.html").read_text()


def test_audit_options_are_checked(tmp_path):
    as_dataset(make_conversations(3), score_a=[0.1, 0.2, 0.3], ref_score=[0.1, 0.2, 0.3]).save_to_disk(
        str(tmp_path / "d")
    )
    assert main(["report", "--scored", str(tmp_path / "d"), "--output", str(tmp_path / "o"), "--audit_rows", "0"]) == 2
