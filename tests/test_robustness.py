"""What real runs meet, each ending in a working run or one line: corrupt GGUF files, an output folder that is a
mount point, a cache on a read-only disk, a max_length past the model's context, characters the tokenizer does not
know, two runs sharing a cache, a corrupt cache line, and a kill while an output is swapped in."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import threading
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import poft.chat as chat_module
from poft import outputs
from poft.chat import ConversationEncoder
from poft.cli import main
from poft.schema import is_poft_output
from poft.score_settings import scoring_settings
from poft.scoring import ScoreConfig, score_dataset
from tests import processes
from tests.conftest import as_dataset, write_jsonl


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
    from poft.errors import ModelError
    from poft.gguf_models import convert_gguf, gguf_problem

    whole, _, _ = gguf_bytes
    (tmp_path / "whole.gguf").write_bytes(whole)
    (tmp_path / "short.gguf").write_bytes(whole[:-1])
    assert gguf_problem(tmp_path / "whole.gguf") is None
    assert gguf_problem(tmp_path / "short.gguf") is not None
    with pytest.raises(ModelError, match=r"^convert_gguf .*short.gguf: short.gguf is cut off or corrupt"):
        convert_gguf(str(tmp_path / "short.gguf"), str(tmp_path / "converted"))
    assert not (tmp_path / "converted").exists()


# --- an output folder that cannot be renamed (a mount point) -----------------------------------------------------


def write_rows(folder: Path, n: int) -> str:
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(n)
    ]
    return write_jsonl(folder / "data.jsonl", [r["messages"] for r in rows])


def temporaries(*folders: Path) -> list[str]:
    return [p.name for f in folders for p in f.iterdir() if outputs.TMP_TAG in p.name or outputs.OLD_TAG in p.name]


@pytest.fixture
def mount_point(tmp_path, monkeypatch) -> Path:
    """An empty folder that, like a mount point, cannot be renamed or exchanged (EBUSY), though what is inside can."""
    out = tmp_path / "volume"
    out.mkdir()
    rename, exchange = os.rename, outputs._exchange

    def busy(path) -> None:
        if Path(path).absolute() == out:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))

    monkeypatch.setattr(outputs.os, "rename", lambda a, b: busy(a) or busy(b) or rename(a, b))
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: busy(a) or busy(b) or exchange(a, b))
    return out


def test_an_output_folder_that_cannot_be_renamed_is_filled_in_place(mount_point, tmp_path, capsys):
    data = write_rows(tmp_path, 40)
    assert main(["noise", "--data", data, "--output", str(mount_point), "--rate", "0.5"]) == 0, capsys.readouterr().err
    first = load_from_disk(str(mount_point))
    assert len(first) == 40 and sum(first["poft_noise"]) == 20 and is_poft_output(mount_point)
    argv = ["noise", "--data", data, "--output", str(mount_point), "--rate", "0.25", "--overwrite"]
    assert main(argv) == 0
    second = load_from_disk(str(mount_point))
    assert len(second) == 40 and sum(second["poft_noise"]) == 10
    assert temporaries(tmp_path, mount_point) == []


def test_a_mount_point_gets_its_temporary_inside_it(tmp_path, monkeypatch):
    """Where the folder is a mount point, the temporary is made inside it (its parent may be read-only), and the
    output still appears whole."""
    out = tmp_path / "volume"
    out.mkdir()
    monkeypatch.setattr(outputs.os.path, "ismount", lambda p: Path(p) == out)
    with outputs.atomic_output(out, "test") as tmp:
        assert tmp.parent == out
        Dataset.from_dict({"version": [1] * 5}).save_to_disk(str(tmp))
    assert load_from_disk(str(out))["version"] == [1] * 5 and temporaries(tmp_path, out) == []


SRC = str(Path(__file__).parent.parent / "src")
CHILD_ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}  # the poft under test; poft.outputs is light

FILLING_WRITER = """
import errno, os, shutil
from pathlib import Path
from poft import outputs

out, new, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rename, exchange, count = os.rename, outputs._exchange, [0]


def busy(path) -> None:  # out is a mount point: it cannot be renamed or exchanged, though what is inside can
    if Path(path).absolute() == out:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))


def counted(a, b) -> None:
    if count[0] == kill_at:
        stop_here(f"before rename {kill_at}")
    count[0] += 1
    busy(a)
    busy(b)
    rename(a, b)


outputs.os.rename = counted
outputs._exchange = lambda a, b: busy(a) or busy(b) or exchange(a, b)
with outputs.atomic_output(out, "test") as tmp:
    shutil.copytree(new, tmp, dirs_exist_ok=True)
print("done", flush=True)
"""


@pytest.mark.parametrize("renames_before_the_kill", range(8))
def test_a_kill_while_filling_in_place_is_finished_by_the_next_run(mount_point, tmp_path, renames_before_the_kill):
    """A process filling the folder in place is SIGKILLed after any number of its renames (7 is all of them): the next
    run (here its recovery) leaves the old output whole or the new one whole, nothing of the other and no
    temporary."""
    with outputs.atomic_output(mount_point, "test") as tmp:
        Dataset.from_dict({"version": [1] * 30}).save_to_disk(str(tmp))
        (tmp / "old_only.txt").write_text("an entry the new output does not have")
    new = tmp_path / "new"
    Dataset.from_dict({"version": [2] * 30}).save_to_disk(str(new))
    writer = processes.start(FILLING_WRITER, str(mount_point), str(new), str(renames_before_the_kill), env=CHILD_ENV)
    said = processes.reached(writer)
    killed = said == f"before rename {renames_before_the_kill}"
    assert killed or said == "done", said
    processes.sigkill(writer)
    outputs.check_output(mount_point, overwrite=True)  # what the next run does first
    versions = set(load_from_disk(str(mount_point))["version"])
    assert versions in ({1}, {2}) and temporaries(tmp_path, mount_point) == []
    assert (mount_point / "old_only.txt").exists() == (versions == {1})
    assert is_poft_output(mount_point)
    assert killed == (renames_before_the_kill < 7)
    if not killed:
        assert versions == {2}


# --- a kill while an output is swapped in ------------------------------------------------------------------------

SWAPPING_WRITER = """
import shutil
from pathlib import Path
from poft import outputs

out, new, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
exchange, rename, rmtree = outputs._exchange, outputs.os.rename, outputs.shutil.rmtree


def exchanged(a, b) -> bool:  # the old output now lies where the temporary was, not yet deleted
    done = exchange(a, b)
    if done and point == "exchanged":
        stop_here(point)
    return done


def renamed(a, b) -> None:  # the old output renamed aside, the new one not yet in
    rename(a, b)
    if Path(a) == out and point == "aside":
        stop_here(point)


def removed(path, *args, **kwargs) -> None:  # the new output in place, the old one aside not yet deleted
    if outputs.OLD_TAG in Path(path).name and point == "new in place":
        stop_here(point)
    rmtree(path, *args, **kwargs)


outputs._exchange = exchanged if point == "exchanged" else (lambda a, b: False)  # else: no renameat2
outputs.os.rename, outputs.shutil.rmtree = renamed, removed
with outputs.atomic_output(out, "test") as tmp:
    shutil.copytree(new, tmp, dirs_exist_ok=True)
    if point == "writing":
        stop_here(point)
print("done", flush=True)
"""


def test_what_a_killed_swap_leaves_is_removed_by_the_next_run_writing_beside_it(tmp_path):
    """A process replacing its output, SIGKILLed at each moment of the swap (while writing the temporary; after the
    exchange, before deleting the old output; between the two renames of systems without renameat2; before deleting
    the old output renamed aside): whatever it left is gone after the next run writing any output or file in that
    folder, and the output is the old one or the new one, whole."""
    out = tmp_path / "out"

    def killed_at(point: str, version: int, next_run: str) -> None:
        new = tmp_path / "versions" / str(version)
        Dataset.from_dict({"version": [version] * 10}).save_to_disk(str(new))
        writer = processes.start(SWAPPING_WRITER, str(out), str(new), point, env=CHILD_ENV)
        assert processes.reached(writer) == point
        processes.sigkill(writer)
        assert temporaries(tmp_path), point  # the kill left something to clean up
        if next_run == "file":
            outputs.atomic_write_text(tmp_path / "notes.txt", "a single file written beside it")
        else:
            with outputs.atomic_output(tmp_path / f"other{version}", "test") as tmp:
                Dataset.from_dict({"x": [version]}).save_to_disk(str(tmp))
        assert temporaries(tmp_path) == [], point

    killed_at("writing", 0, "output")  # the first output, killed while written: none is left
    assert not out.exists()
    with outputs.atomic_output(out, "test") as tmp:
        Dataset.from_dict({"version": [1] * 10}).save_to_disk(str(tmp))
    for point, version, next_run, left in [
        ("exchanged", 2, "file", 2),
        ("aside", 3, "file", 2),  # the old output, renamed aside, is restored
        ("new in place", 4, "output", 4),
        ("writing", 5, "file", 4),
    ]:
        killed_at(point, version, next_run)
        assert set(load_from_disk(str(out))["version"]) == {left}, point


# --- a score cache that cannot be created ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["read-only", "/proc"])
def test_a_cache_dir_that_cannot_be_created_is_one_line(
    tiny_models, conversations, where, tmp_path, monkeypatch, capsys
):
    if where == "read-only":  # root writes through chmod, so the read-only file system is simulated
        cache = tmp_path / "readonly" / "scores"
        mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):
            if tmp_path / "readonly" in (self, *self.parents):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    else:
        cache = Path("/proc/poft-scores")  # a real file system where no folder can be made
    data = write_jsonl(tmp_path / "d.jsonl", conversations[:3])
    argv = ["score", "--data", data, "--model", tiny_models["chatml"], "--output", str(tmp_path / "o")]
    assert main([*argv, "--cache_dir", str(cache), "--device", "cpu"]) == 2
    (line,) = error_lines(capsys)
    assert re.fullmatch(
        rf"poft score: error: the score cache folder {re.escape(str(cache))} cannot be created \(.+\)\. Give a "
        r"writable --cache_dir, or set POFT_CACHE to a writable folder\.",
        line,
    )
    assert not (tmp_path / "o").exists()


# --- max_length past the model's context, and huge rows ----------------------------------------------------------


def long_chats(n: int, chars: int, seed: int = 0) -> list[list[dict]]:
    """Chats whose turns are `chars` characters of the tiny models' words, so most run past 512 tokens."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "pixel"]

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(chars // 6))[: rng.randint(chars // 2, chars)]

    chats = []
    for i in range(n):
        chat = [{"role": "system", "content": "Answer briefly."}] if i % 2 else []
        for _ in range(1 + i % 3):
            chat += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        chats.append(chat)
    return chats


def test_max_length_past_the_context_reads_up_to_the_context_and_records_it(tiny_models, tmp_path, caplog):
    """The tiny references have 512 positions: --max_length 2048 scores as --max_length 512 does, says so naming
    both, and the score columns record 512, the truncation really used."""
    dataset = as_dataset(long_chats(6, 400))
    model = tiny_models["chatml"]  # one token per character
    assert AutoConfig.from_pretrained(model).max_position_embeddings == 512
    at_context = score_dataset(dataset, [model], ScoreConfig(max_length=512, cache_dir=str(tmp_path / "a")))
    with caplog.at_level(logging.WARNING, logger="poft"):
        past = score_dataset(dataset, [model], ScoreConfig(max_length=2048, cache_dir=str(tmp_path / "b")))
    assert max(past["n_tokens_chatml"]) > 0 and past["score_chatml"] == at_context["score_chatml"]
    assert (
        "reference 'chatml': --max_length 2048 is beyond the model's context (max_position_embeddings=512), so "
        "conversations are read up to 512 tokens, as its scores record." in caplog.text
    )
    for column in ("score_chatml", "ref_score"):
        assert scoring_settings(past, column)["max_length"] == 512
    unbounded = score_dataset(dataset, [model], ScoreConfig(max_length=None, cache_dir=str(tmp_path / "c")))
    assert unbounded["score_chatml"] == at_context["score_chatml"]
    assert scoring_settings(unbounded, "ref_score")["max_length"] == 512


def test_a_max_length_past_the_context_that_cuts_nothing_is_recorded_as_asked(tiny_models, conversations, tmp_path):
    """No conversation reaches the context: the scores are those --max_length 2048 gives, recorded as such, and
    nothing is said."""
    scored = score_dataset(
        as_dataset(conversations), [tiny_models["chatml"]], ScoreConfig(max_length=2048, cache_dir=str(tmp_path))
    )
    assert scoring_settings(scored, "ref_score")["max_length"] == 2048


def reference_encoding(encoder, messages) -> tuple[list[int], list[int], bool]:
    """The whole conversation tokenized, then cut to max_length: what `encode` returns, computed the long way."""
    ids, mask, _ = encoder.encode_spans(messages)
    n = encoder.max_length
    if len(ids) <= n:
        return ids, mask, False
    window = slice(None, n) if encoder.truncation_mode == "keep_start" else slice(-n, None)
    return ids[window], mask[window], True


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_a_long_conversation_read_in_a_window_equals_it_read_whole(tiny_models, template_models, mode):
    chats = long_chats(12, 3000, seed=1) + [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "apple river " * 4000}],
        [{"role": "user", "content": "apple " * 4000}, {"role": "assistant", "content": "stone"}],
    ]
    for path in [*tiny_models.values(), *template_models.values()]:
        tokenizer = AutoTokenizer.from_pretrained(path)
        for max_length in (16, 100, 700):
            encoder = ConversationEncoder(tokenizer, max_length=max_length, truncation_mode=mode, system_turns="merge")
            windows = 0
            for chat in chats:
                encoded = encoder.encode(chat)
                assert (encoded.input_ids, encoded.response_mask, encoded.truncated) == reference_encoding(
                    encoder, chat
                ), (path, max_length)
                windows += len(encoder.render(encoder.prepare(chat))) > chat_module.WINDOW_CHARS_PER_TOKEN * (
                    max_length + chat_module.WINDOW_MARGIN
                )
            assert windows  # the window was used


def test_a_huge_row_is_tokenized_only_near_what_is_kept(tiny_models, monkeypatch):
    """A 5 MB response with max_length 512: the tokenizer reads a window of it, not 5 MB."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["chatml"])
    encoder = ConversationEncoder(tokenizer, max_length=512)
    read = []
    call = type(tokenizer).__call__
    monkeypatch.setattr(
        type(tokenizer), "__call__", lambda self, text, **kw: read.append(len(text)) or call(self, text, **kw)
    )
    huge = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ("apple river stone " * 300_000)[:5_000_000]},
    ]
    encoded = encoder.encode(huge)
    assert len(encoded.input_ids) == 512 and encoded.truncated and sum(encoded.response_mask) > 400
    assert max(read) < 100_000


# --- characters the tokenizer does not know ----------------------------------------------------------------------


def test_a_character_the_tokenizer_does_not_know_is_named_with_its_row_not_blamed_on_the_template(
    tiny_models, conversations, tmp_path, caplog
):
    """The char-level reference maps '€' to <unk>; a response also holding the text '<unk>' used to fail the
    template guard. It is scored, with one warning naming the character, the row and the tokenizer's vocabulary."""
    chats = [
        *conversations[:3],
        [{"role": "user", "content": "Price?"}, {"role": "assistant", "content": "say <unk> 5 €"}],
    ]
    with caplog.at_level(logging.WARNING, logger="poft"):
        scored = score_dataset(as_dataset(chats), [tiny_models["chatml"]], ScoreConfig(cache_dir=str(tmp_path)))
    assert all(s is not None for s in scored["score_chatml"])
    assert (
        "reference 'chatml': 1 conversations have response text its tokenizer reads as its unknown token: '<unk>', "
        "'€' (U+20AC) (first: conversation 4 of the data). This is the tokenizer's vocabulary, not the chat template"
        in caplog.text
    )


def test_an_undeclared_unknown_token_is_known_by_the_tokenizer_model(tiny_models):
    """A tokenizer built from a `tokenizers` object that does not declare its unknown token: '€' reads as the
    model's <unk>, and the mask covers it as it covers any response character."""
    from transformers import PreTrainedTokenizerFast

    from poft.demo.builders import CHATML_SPECIALS

    declared = AutoTokenizer.from_pretrained(tiny_models["chatml"])
    undeclared = PreTrainedTokenizerFast(
        tokenizer_object=declared.backend_tokenizer, pad_token="<pad>", eos_token="<|im_end|>"
    )
    undeclared.add_special_tokens({"additional_special_tokens": CHATML_SPECIALS})
    undeclared.chat_template = declared.chat_template
    assert undeclared.unk_token is None
    chat = [{"role": "user", "content": "Price?"}, {"role": "assistant", "content": "5 € each"}]
    got = ConversationEncoder(undeclared).encode(chat)
    want = ConversationEncoder(declared).encode(chat)
    assert (got.input_ids, got.response_mask, got.unknown) == (want.input_ids, want.response_mask, ("€",))


# --- a score cache with corrupt lines ----------------------------------------------------------------------------


def count_scored(monkeypatch) -> list[int]:
    """The number of conversations each call of the scoring loop is given."""
    import poft.scoring as scoring

    counts, original = [], scoring.iter_scores
    monkeypatch.setattr(scoring, "iter_scores", lambda m, e, *a, **k: counts.append(len(e)) or original(m, e, *a, **k))
    return counts


def test_corrupt_cache_lines_are_rescored_with_one_warning(tiny_models, conversations, tmp_path, monkeypatch, caplog):
    dataset = as_dataset(conversations)
    config = ScoreConfig(cache_dir=str(tmp_path))
    first = score_dataset(dataset, [tiny_models["chatml"]], config)
    (path,) = tmp_path.glob("*.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    records[0]["score"] = "high"  # wrong type
    records[1]["score"] = float("nan")  # non-finite
    records[2] = {"id": records[2]["poft_id"], "score": records[2]["score"]}  # wrong key
    lines[:3] = [json.dumps(r).encode() + b"\n" for r in records[:3]]
    lines[3] = b"\x00\xff{not json\n"
    path.write_bytes(b"".join(lines))
    counts = count_scored(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="poft"):
        again = score_dataset(dataset, [tiny_models["chatml"]], config)
    assert counts == [4] and again["score_chatml"] == pytest.approx(first["score_chatml"], abs=1e-6)
    assert caplog.text.count("are corrupt and ignored") == 1
    assert (
        f"{path}: 4 of {len(lines)} lines are corrupt and ignored (first: line 1, wrong fields or types" in caplog.text
    )


# --- two runs sharing a score cache ------------------------------------------------------------------------------


def test_two_runs_sharing_a_cache_score_each_row_once(tiny_models, conversations, tmp_path, monkeypatch, caplog):
    """A second run starts while the first is scoring (held there until the second says it waits for the cache's
    lock): it waits, then reads what the first wrote, and every row is scored once in all, with the scores of one run
    alone."""
    import poft.scoring as scoring

    dataset = as_dataset(conversations)
    alone = score_dataset(dataset, [tiny_models["zephyr"]], ScoreConfig(cache_dir=str(tmp_path / "alone")))
    config = ScoreConfig(cache_dir=str(tmp_path / "shared"))
    counts, scoring_started, second_waits = [], threading.Event(), threading.Event()
    original = scoring.iter_scores

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Another run is scoring this reference into"):
                second_waits.set()

    def held_scores(model, encoded, *args, **kwargs):
        counts.append(len(encoded))
        scoring_started.set()
        if not second_waits.wait(120):  # the second run reaches the lock meanwhile
            raise TimeoutError("the second run never waited for the cache's lock")
        yield from original(model, encoded, *args, **kwargs)

    monkeypatch.setattr(scoring, "iter_scores", held_scores)
    results = {}

    def run(name: str) -> None:
        results[name] = score_dataset(dataset, [tiny_models["zephyr"]], config)

    first = threading.Thread(target=run, args=("first",))
    watcher = Waiting()
    logging.getLogger("poft").addHandler(watcher)
    try:
        with caplog.at_level(logging.WARNING, logger="poft"):
            first.start()
            assert scoring_started.wait(120)
            run("second")
            first.join(120)
    finally:
        logging.getLogger("poft").removeHandler(watcher)
    assert not first.is_alive() and second_waits.is_set()
    assert sum(counts) == len(set(dataset["poft_id"]))
    assert results["first"]["score_zephyr"] == results["second"]["score_zephyr"] == alone["score_zephyr"]
