"""Optional dependencies: a missing one ends with one line naming the extra that installs it."""

from __future__ import annotations

import json
import sys

import pytest
from trl import ModelConfig

from poft.cli import main
from poft.errors import DependencyError
from poft.optional import check_model_extras, require


def hide(monkeypatch, *modules: str) -> None:
    """Make `import module` fail as it does where the package is not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_require_names_the_extra(monkeypatch):
    hide(monkeypatch, "scipy", "scipy.stats")
    with pytest.raises(
        DependencyError, match=r"^The audit needs scipy, which is not installed: pip install 'poft\[report\]'\.$"
    ):
        require("scipy.stats", "report", "The audit")
    assert require("json", "report", "JSON") is json


@pytest.mark.parametrize(
    ("options", "module", "extra"),
    [({"use_peft": True}, "peft", "peft")],
)
def test_model_options_that_need_an_extra(monkeypatch, options, module, extra):
    hide(monkeypatch, module)
    with pytest.raises(DependencyError, match=rf"pip install 'poft\[{extra}\]'"):
        check_model_extras(ModelConfig(model_name_or_path="m", **options))
    check_model_extras(ModelConfig(model_name_or_path="m"))  # nothing optional asked for: nothing needed


def test_poft_report_without_its_extra_is_one_line(tmp_path, monkeypatch, capsys):
    results = tmp_path / "eval_results.json"
    results.write_text(json.dumps({"results": {"model": {"task": {"acc": 0.5}}}}))
    hide(monkeypatch, "markdown_it")
    assert main(["report", "--eval", str(results), "--output", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "poft report: error: report.html needs markdown_it, which is not installed: pip install 'poft[report]'."
    )
