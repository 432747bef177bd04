"""The lifecycle of a dataset stage (`poft score`, `poft noise`, `poft filter`), written once.

`StageIO` holds the options every dataset stage shares (its config inherits them). Each runner checks its
own options, declares what it writes, and fills in the transform; `open_stage` and `StageRun.write` do the
rest: refuse missing paths and a destructive output before any work, decide which inherited columns survive,
build the output atomically (`poft.outputs`), load, replace or refuse columns, save, and write the records
that follow the data (`poft.schema`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

from poft.data import load_sft_dataset
from poft.errors import DataError, OptionError
from poft.options import skip_invalid_field
from poft.outputs import atomic_output, check_output
from poft.schema import poft_columns, read_filter_history, write_filter_history

logger = logging.getLogger(__name__)


@dataclass
class StageIO:
    """Where a dataset stage (`poft score`, `filter`, `noise`) reads and writes, and what it may replace."""

    data: str | None = field(
        default=None,
        metadata={"help": "SFT data: a JSONL/JSON/Parquet/CSV file, a saved dataset directory or a hub id."},
    )
    split: str = field(default="train", metadata={"help": "Split to read from a dataset directory or hub dataset."})
    output: str | None = field(
        default=None, metadata={"help": "Directory for the output dataset (loadable with datasets.load_from_disk)."}
    )
    skip_invalid: bool = skip_invalid_field("OUTPUT/invalid_rows.jsonl")
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace a previous poft output at --output (even the input itself, atomically), and input "
            "columns poft computes (poft_id, ref_score, score_<name>, poft_filters, ifd, poft_noise) that poft "
            "did not write."
        },
    )

    def load_input(self, output_tmp: Path | None = None) -> Dataset:
        """The input rows; with --skip_invalid, bad rows go to `invalid_rows.jsonl` in the output being written."""
        report = output_tmp / "invalid_rows.jsonl" if self.skip_invalid and output_tmp is not None else None
        return load_sft_dataset(
            self.data,
            split=self.split,
            skip_invalid=self.skip_invalid,
            invalid_report=report,
            replace_poft_id=self.overwrite,
        )


def foreign_columns(
    column_names: Iterable[str], written: Iterable[str], source: str, ours: set[str], overwrite: bool
) -> list[str]:
    """The input columns this run would write that poft did not write: refused unless `overwrite`.

    A column poft wrote (recorded in the input's marker) is poft's to replace; any other may be the
    user's own data. Returns the foreign columns (to be replaced) when `overwrite` is given.
    """
    written = set(written)
    foreign = [c for c in column_names if c in written and c not in ours]
    if foreign and not overwrite:
        raise DataError(
            f"{source}: the column {foreign[0]!r} is not one poft wrote, and this run would replace it. Rename it, "
            "or pass --overwrite to replace it."
        )
    return foreign


def _nothing_stale(column: str) -> bool:
    return False


@dataclass
class StageRun:
    """A dataset stage whose paths are checked: what it inherits from its input (poft's columns, filter records)."""

    io: StageIO
    command: str
    inherited: set[str]
    history: list[dict]

    def write(
        self,
        writes: Iterable[str],
        transform: Callable[[Dataset], Dataset],
        stale: Callable[[str], bool] = _nothing_stale,
        stale_reason: str = "",
        record: Callable[[Path, Dataset, list[str]], None] | None = None,
        main_process: bool = True,
    ) -> Dataset:
        """Load the input, make room for the columns this run `writes`, `transform`, save atomically; return the output.

        The one rule for inherited columns: a column poft computed in an earlier stage (named in the
        input's `poft_output.json`) survives, and stays poft's in the output's record, unless this stage
        makes it `stale` (it scores content the stage changes, or belongs to a score the stage replaces):
        then it is dropped, with a warning giving `stale_reason`. A column the stage writes that the input
        already has is handed to `transform` to extend or replace when poft wrote it, and is refused, or
        removed with --overwrite, when poft did not. Columns poft never wrote pass through untouched.
        The filter records (`filter_summary.json`, appended to in `self.history`) follow the data;
        `record(directory, output, dropped)` writes the stage's own record. Only the main process writes.
        """
        writes = set(writes)
        stale_columns = {c for c in self.inherited if stale(c) and c not in writes}
        columns = (self.inherited - stale_columns) | writes
        writing = atomic_output(self.io.output, self.command, columns) if main_process else nullcontext(None)
        with writing as tmp:
            dataset = self.io.load_input(tmp)
            foreign = foreign_columns(dataset.column_names, writes, self.io.data, self.inherited, self.io.overwrite)
            dropped = [c for c in dataset.column_names if c in stale_columns]
            if dropped:
                logger.warning("Dropped %s: %s", ", ".join(dropped), stale_reason)
            output = transform(dataset.remove_columns(foreign + dropped))
            if tmp is None:
                return output
            output.save_to_disk(str(tmp))
            if self.history:
                write_filter_history(tmp, self.history)
            if record is not None:
                record(tmp, output, dropped)
        logger.info("Saved %d rows to %s", len(output), self.io.output)
        return output


def open_stage(io: StageIO, command: str) -> StageRun:
    """Refuse, before any work, missing paths, an output that would destroy something, or corrupt filter records."""
    if not io.data or not io.output:
        raise OptionError(f"poft {command} needs --data and --output.")
    check_output(io.output, [io.data], io.overwrite)
    return StageRun(io, command, poft_columns(io.data), read_filter_history(io.data))
