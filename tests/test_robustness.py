"""What real runs meet, each ending in a working run or one line: corrupt GGUF files, an output folder that is a
mount point, a cache on a read-only disk, a max_length past the model's context, characters the tokenizer does not
know, two runs sharing a cache, a corrupt cache line, and a kill while an output is swapped in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft.cli import main
from tests.conftest import write_jsonl


def error_lines(capsys) -> list[str]:
    return re.findall(r"poft \w+: error: .*", capsys.readouterr().err)


# --- corrupt GGUF references -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_bytes(tiny_models, tmp_path_factory) -> tuple[bytes, int, bytes]:
    """A whole tiny GGUF, where its tensor data starts, and a safetensors file's bytes."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    from tests.gguf_writer import write_gguf

    folder = tmp_path_factory.mktemp("gguf")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["zephyr"])
    path = write_gguf(model, AutoTokenizer.from_pretrained(tiny_models["zephyr"]), folder / "whole.gguf")
    weights = (Path(tiny_models["zephyr"]) / "model.safetensors").read_bytes()
    return path.read_bytes(), GGUFReader(str(path)).data_offset, weights


@pytest.mark.parametrize(
    "case, problem",
    [
        ("empty", r"is empty \(0 bytes\)\. Download or convert the model again\."),
        ("text", r"is not a GGUF file \(it starts with b'hello wo', not b'GGUF'\)\. Download or convert"),
        ("safetensors", r"is a safetensors file, not GGUF\. Put it in a model folder"),
        ("cut in the header", r"is cut off or corrupt \(\d+ bytes; the GGUF reader says: .+\)\. Download or convert"),
        ("cut in the tensors", r"is cut off or corrupt \(\d+ bytes; the GGUF reader says: .+\)\. Download or convert"),
    ],
)
def test_a_corrupt_gguf_is_one_line_naming_the_file_in_score_and_eval(gguf_bytes, case, problem, tmp_path, capsys):
    whole, data_offset, safetensors = gguf_bytes
    content = {
        "empty": b"",
        "text": b"hello world\n" * 10,
        "safetensors": safetensors,
        "cut in the header": whole[: data_offset // 2],
        "cut in the tensors": whole[: data_offset + (len(whole) - data_offset) // 2],
    }[case]
    model = tmp_path / "model.gguf"
    model.write_bytes(content)
    data = write_jsonl(
        tmp_path / "d.jsonl", [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]
    )
    for command in ("score", "eval"):
        argv = [command, "--data", data, "--model", str(model), "--output", str(tmp_path / command), "--device", "cpu"]
        assert main(argv) == 2
        (line,) = error_lines(capsys)
        assert re.fullmatch(rf"poft {command}: error: --model {re.escape(str(model))}: model.gguf {problem}.*", line)
    assert not (tmp_path / "score").exists()


def test_a_whole_gguf_passes_the_check_and_its_last_byte_is_needed(gguf_bytes, tmp_path):
    from poft.gguf_models import gguf_problem

    whole, _, _ = gguf_bytes
    (tmp_path / "whole.gguf").write_bytes(whole)
    (tmp_path / "short.gguf").write_bytes(whole[:-1])
    assert gguf_problem(tmp_path / "whole.gguf") is None
    assert gguf_problem(tmp_path / "short.gguf") is not None
