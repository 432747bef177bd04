"""Small runtime helpers every stage shares: devices, dtypes, where caches live, the training glue.

Kept in one place (as nanochat's `common.py`) so that a fix to, say, the bf16 default reaches `poft
train`, `poft dpo` and the demo alike.
"""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from poft.errors import DependencyError, ModelError, OptionError, OutputError, PoftError
from poft.optional import check_model_extras
from poft.outputs import DISK_ERRORS, disk_error

logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR, without importing it here
RESUME_LAST = ("true", "1", "yes")
RESUME_FRESH = ("false", "0", "no", "none", "")
# What torch.save's C++ writer raises when a write fails part-way (it reports no errno): PyTorch 2.x's messages.
TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "inline_container.cc", "iostream error", "file write failed")


def resolve_device(device: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a device this machine lacks (or a misspelt one) is an OptionError."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise OptionError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps.") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (resolved.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(resolved.type, True):
        raise OptionError(
            f"--device {device} is not available on this machine"
            + (f" ({torch.cuda.device_count()} CUDA devices)" if resolved.type == "cuda" else "")
            + "; use --device auto or cpu."
        )
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise OptionError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return dtypes[dtype]


def cache_root() -> Path:
    """Where poft keeps what it can recompute: $POFT_CACHE, else ~/.cache/poft."""
    return Path(os.environ.get("POFT_CACHE", Path.home() / ".cache" / "poft"))


def default_bf16(bf16: bool | None, fp16: bool) -> bool:
    """The bf16 setting of a training config whose user left it unset: on only where the hardware runs bf16.

    Workaround: TRL 1.16's SFTConfig and DPOConfig turn bf16 on unconditionally when it is unset, which
    fails on machines without bf16 support (a laptop CPU). Remove once TRL follows the hardware itself.
    """
    if bf16 is not None or fp16:
        return bool(bf16)
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def machine_defaults(args) -> None:
    """Settings of a training config (TrainingArguments) that follow the machine and the output, set before
    transformers' own `__post_init__`: no pinned memory without an accelerator (pinning then does nothing and torch
    warns on every DataLoader), and, unless the user set `disable_tqdm`, progress bars only on a terminal, so a log
    file gets transformers' PrinterCallback (one line per logging step) instead of bars redrawn in it."""
    if args.use_cpu or not torch.accelerator.is_available():
        args.dataloader_pin_memory = False
    if args.disable_tqdm is None:
        args.disable_tqdm = not sys.stderr.isatty()


def progress_bars_on_terminal_only() -> None:
    """Turn off the progress bars of transformers (weight loading), datasets (map, filter) and the hub (downloads)
    when stderr is not a terminal: in a log file a bar is a line per redraw. The command line calls this once."""
    if sys.stderr.isatty():
        return
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def quantization_config(model_args):
    """TRL's `get_quantization_config(model_args)` for `--load_in_4bit` / `--load_in_8bit` (QLoRA), after checking
    that it can run: LoRA on (as TRL's ModelConfig says, quantized weights train only through adapters), a
    bitsandbytes that transformers accepts (installed, at its minimum version), and a device it supports. Each
    failure is one line, never a full-precision run."""
    from trl import get_quantization_config

    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
    if not model_args.use_peft:
        raise OptionError(
            f"{flag} trains LoRA adapters on the quantized model (QLoRA); add --use_peft true, or leave {flag} out."
        )
    if not bitsandbytes_installed():
        raise DependencyError(
            f"{flag} needs bitsandbytes, which is not installed: pip install 'poft[quantization]' (or leave {flag} out)."
        )
    from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION, is_bitsandbytes_available

    if not is_bitsandbytes_available():  # below this, transformers' own device check fails with a NameError
        raise DependencyError(
            f"{flag} needs bitsandbytes >= {BITSANDBYTES_MIN_VERSION} (transformers' minimum), found "
            f"{importlib.metadata.version('bitsandbytes')}: pip install -U 'poft[quantization]' (or leave {flag} out)."
        )
    supported, available = bitsandbytes_devices()
    if not supported & available:
        raise OptionError(
            f"{flag}: bitsandbytes {importlib.metadata.version('bitsandbytes')} supports none of this machine's "
            f"devices ({', '.join(sorted(available))}; it supports {', '.join(sorted(supported)) or 'none'}); leave "
            f"{flag} out to train in full precision."
        )
    return get_quantization_config(model_args)


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def bitsandbytes_devices() -> tuple[set[str], set[str]]:
    """The devices the installed bitsandbytes supports and this machine's, the two sets transformers' own check
    (`validate_bnb_backend_availability`) compares before it loads a quantized model."""
    import bitsandbytes
    from transformers.utils import get_available_devices

    return set(getattr(bitsandbytes, "supported_torch_devices", ())), set(get_available_devices())


def train_and_save(trainer_class, model_args, training_args, train_dataset, eval_dataset=None) -> str:
    """Build a TRL trainer for `model_args` (PEFT and quantization included, as TRL's own scripts pass them), train,
    then save the model and trainer_state.json (the logged curves `poft report --runs` plots). `poft train` and
    `poft dpo` differ only in what they pass."""
    from trl import get_peft_config

    check_model_extras(model_args)
    quantization = quantization_config(model_args)
    resume = resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    try:
        trainer = trainer_class(
            model_args.model_name_or_path,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=get_peft_config(model_args),
            quantization_config=quantization,
        )
    except OSError as error:  # from_pretrained: a hub id that is unreachable (offline) or does not exist
        if isinstance(error, PoftError):
            raise
        raise ModelError(
            f"Cannot load --model_name_or_path {model_args.model_name_or_path}: {str(error).splitlines()[0]} Give a "
            "local model folder, or a hub id that is reachable or already in the Hugging Face cache."
        ) from error
    output_dir = training_args.output_dir
    before = set(_checkpoints(output_dir))
    try:
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(output_dir)
        trainer.save_state()
    except Exception as error:  # a full or read-only disk while checkpointing or saving: one line, no half checkpoint
        translated = save_error(error, f"checkpoints or the model to {output_dir}", output_dir)
        if translated is None:
            raise
        left = []  # a read-only disk keeps the unfinished checkpoint it stopped; resuming skips it
        for partial in sorted(set(_checkpoints(output_dir)) - before):
            if not _complete_checkpoint(partial):
                shutil.rmtree(partial, ignore_errors=True)
                if os.path.exists(partial):
                    left.append(os.path.basename(partial))
        skipped = f", which skips the unfinished {', '.join(left)} (it could not be removed)" if left else ""
        raise OutputError(
            f"{translated} Complete checkpoints in {output_dir} are kept: resume with --resume_from_checkpoint "
            f"true{skipped}."
        ) from error
    logger.info("Saved the model to %s", output_dir)
    leave_process_group(trainer.accelerator)
    return output_dir


def leave_process_group(accelerator, settle_seconds: float = 30.0) -> None:
    """Every process meets the others, then leaves the process group, before it exits.

    A gloo group still alive at interpreter exit can abort a process ("terminate called without an active exception")
    after everything was saved. Leaving it has a trap of its own: the group's C++ destructor (run when its last
    owner, DDP's reducer, is freed) joins gloo's worker threads while holding the GIL, and a worker thread still
    freeing a collective's tensors needs the GIL: a deadlock, seen in 2-process CPU runs that met by a barrier (the
    worker was freeing an all-gather). So on gloo the processes meet by an all-reduce of a tensor held here, and
    wait, the GIL released, until the worker has let go of it. They meet so on every gloo group, not only the
    default one: DeepSpeed makes a clone of the world group, and its objects (the ZeRO-3 parameters, the optimizer)
    keep both groups and their worker threads alive past `end_training`, until the interpreter finalizes, where
    Python 3.11 ends a thread that is still waiting for the GIL: inside C++ code, that can be this abort.
    """
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "gloo":
            meetings = []
            for group in gloo_groups():
                meeting = torch.zeros(1)
                torch.distributed.all_reduce(meeting, group=group)
                meetings.append(meeting)
            deadline = time.monotonic() + settle_seconds
            time.sleep(0.01)  # at least once: every gloo worker gets the GIL to finish freeing what it holds
            while any(meeting._use_count() > 1 for meeting in meetings) and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            accelerator.wait_for_everyone()
    accelerator.end_training()


def gloo_groups() -> list:
    """The gloo groups this process is in, the default one first, in the same order on every process (the order of
    their names, which torch gives every process alike).

    Workaround: torch has no public list of a process's groups; this reads the table `destroy_process_group` walks
    (`distributed_c10d._world.pg_names`). Replace it when torch lists them publicly.
    """
    from torch.distributed import distributed_c10d

    names = distributed_c10d._world.pg_names
    default = distributed_c10d._get_default_group()
    groups = sorted((group for group in names if group is not default), key=names.get)
    return [group for group in [default, *groups] if torch.distributed.get_backend(group) == "gloo"]


def resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names, or None for a fresh run.

    true (True, 1, yes): the last complete checkpoint in `output_dir`, as transformers' example scripts resolve it
    with get_last_checkpoint; where there is none, a fresh run with a warning, so that one command serves a job's
    first start and every restart. A path: that checkpoint. false, none, 0 or empty: a fresh run.
    TrainingArguments types the option as a path, so without this the flag's `true` reaches Trainer.train as a
    folder name. A checkpoint cut off by a kill or a full disk (see `_complete_checkpoint`) is never resumed from.
    """
    if value is None or value is False:
        return None
    text = str(value).strip()
    if text.lower() in RESUME_FRESH:
        return None
    if value is True or text.lower() in RESUME_LAST:
        by_step = sorted(_checkpoints(output_dir), key=_checkpoint_step, reverse=True)
        for path in by_step:
            if _complete_checkpoint(path):
                return path
            logger.warning(
                "%s is incomplete (no readable trainer_state.json: a kill or a full disk cut it off); it is not "
                "resumed from.",
                path,
            )
        logger.warning(
            "--resume_from_checkpoint %s: no complete checkpoint in --output_dir %s, so training starts from the "
            "beginning.",
            text,
            output_dir,
        )
        return None
    if not os.path.isdir(text):
        raise OptionError(
            f"--resume_from_checkpoint {text}: no such folder. Give a checkpoint-N folder of an earlier run, or true "
            "for the last complete one in --output_dir."
        )
    if not _complete_checkpoint(text):
        raise OptionError(
            f"--resume_from_checkpoint {text} is not a complete checkpoint (no readable trainer_state.json, which "
            "the trainer writes last). Give another checkpoint-N folder, or true for the last complete one in "
            "--output_dir."
        )
    return text


def save_error(error: BaseException, what: str, directory: str) -> OutputError | None:
    """A one-line OutputError for a full, read-only or forbidden disk while saving, whichever library was writing;
    None for any other error.

    json and tokenizer files raise OSError; safetensors a SafetensorError ending in "(os error 28)"; torch.save (the
    optimizer, scheduler and RNG states) a RuntimeError from its C++ writer, which drops errno: where it could not
    open the file it names the system's reason ("strerror: Permission denied"), and where a write failed part-way
    nothing, so the disk itself is asked what is wrong.
    """
    if isinstance(error, OSError):
        return disk_error(error, what)
    text = str(error)
    code = re.search(r"\(os error (\d+)\)", text)
    if code is not None:
        number = int(code.group(1))
        return disk_error(OSError(number, os.strerror(number)), what)
    if not isinstance(error, RuntimeError) or not any(mark in text for mark in TORCH_WRITE_FAILURES):
        return None
    reason = re.search(r"strerror: (.+)$", text.strip())
    if reason is not None:
        number = next((n for n in DISK_ERRORS if os.strerror(n) == reason.group(1)), None)
        return None if number is None else disk_error(OSError(number, reason.group(1)), what)
    try:
        disk = os.statvfs(directory)
    except OSError:
        return None
    if disk.f_flag & os.ST_RDONLY:
        return disk_error(OSError(errno.EROFS, os.strerror(errno.EROFS)), what)
    free = disk.f_bavail * disk.f_frsize / 2**20
    return OutputError(
        f"cannot write {what}: torch.save stopped part-way with {free:.1f} MiB left on that disk (full, or over "
        "quota). Free space or pick a writable location, then rerun."
    )


def _checkpoints(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return [os.path.join(output_dir, d) for d in os.listdir(output_dir) if _checkpoint_step(d) is not None]


def _checkpoint_step(path: str) -> int | None:
    """N of a `checkpoint-N` folder (the Trainer's naming), else None."""
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", os.path.basename(path))
    return int(match.group(1)) if match else None


def _complete_checkpoint(path: str) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint whose state does not parse was cut off."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


@contextmanager
def output_dir_for(directory: str, option: str) -> Iterator[None]:
    """`check_writable`, and a folder this run created is removed again if the run fails leaving it empty."""
    existed = os.path.exists(directory)
    check_writable(directory, option)
    try:
        yield
    except BaseException:
        if not existed:
            with suppress(OSError):  # not empty (a checkpoint, invalid_rows.jsonl): kept
                os.rmdir(directory)
        raise


def check_writable(directory: str, option: str) -> None:
    """Create `directory` and write a probe file there, so a read-only folder fails before training, not after."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise disk_error(error, f"{option} {directory}") or OutputError(
            f"cannot write {option} {directory}: {error.strerror or error}. Pick a writable folder."
        ) from error
