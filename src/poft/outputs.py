"""Write every output so that a kill or a full disk at any moment leaves the old output or the new one, whole.

A stage that writes a dataset directory (`poft score`, `filter`, `noise`) builds it in a temporary
sibling directory (same parent, so same filesystem) and moves it into place only once it is complete.
An existing output is swapped with the new one in one step (Linux `renameat2(RENAME_EXCHANGE)`) and
then deleted; where that call is missing the old one is renamed aside, the new one renamed in, the old
one deleted, and a later run restores an aside copy if a kill fell between the two renames. A failure
(a full disk included) removes the temporary directory and leaves the old output as it was.

An output folder that cannot be renamed (a mount point, such as a container's volume, or a folder in a
read-only parent) is filled in place instead: the new output is staged whole inside it, then its old
entries are deleted and the new ones moved in, one rename each, the marker last; a kill in between is
finished by the next run. Every run writing into a folder, an output or a single file, first removes the
temporaries that dead runs left there, beside any output, and restores an output a dead run renamed aside.

Every poft dataset output carries `poft_output.json` (the stage and the columns poft computed). An
existing non-empty folder without it is never replaced; one with it is replaced only with
`--overwrite`, and so is an output that is, contains or lies inside an input (the input is read,
memory-mapped, until the new output is complete).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from poft.errors import OutputError
from poft.schema import MARKER, is_poft_output, write_marker

logger = logging.getLogger(__name__)

TMP_TAG, OLD_TAG = ".poft-tmp-", ".poft-old-"
STAGED, MOVING = "-staged", "-moving"  # a whole new output inside its folder: before and after the old is gone
DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def check_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False):
    """Refuse, before any work is done, an output that would destroy something; return its resolved path.

    Refused: an existing file; a non-empty folder that is not a poft output (or the saved dataset being
    read); without `overwrite`, a previous poft output and any output that is, contains or lies inside
    a local input.
    """
    out = Path(output).expanduser().resolve()
    _recover(out)  # a folder a killed run was filling in place is finished first, then judged
    fix = "Choose another --output"
    overlapping = False
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue  # a hub id, or nothing to protect
        path = Path(source).expanduser().resolve()
        if out == path or out in path.parents or path in out.parents:
            overlapping = True
            if not overwrite:
                relation = "is" if out == path else ("contains" if out in path.parents else "lies inside")
                raise OutputError(
                    f"--output {output} {relation} the input {source}: writing there would replace the data being "
                    f"read. {fix}, or pass --overwrite to replace it once the new output is complete."
                )
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {output} is an existing file; poft writes a directory there. {fix}.")
    if out.is_dir() and any(out.iterdir()):
        if not (is_poft_output(out) or (overlapping and _is_saved_dataset(out))):
            raise OutputError(
                f"--output {output} is a non-empty folder that is not a poft output; poft never replaces it. "
                f"{fix} (a new or empty folder)."
            )
        if not overwrite:
            raise OutputError(
                f"--output {output} holds a previous poft output. Pass --overwrite to replace it, or {fix[0].lower()}"
                f"{fix[1:]}."
            )
    return out


def disk_error(error: OSError, what: str) -> OutputError | None:
    """A one-line OutputError for a full, read-only or forbidden disk; None for any other OSError."""
    reason = DISK_ERRORS.get(error.errno)
    if reason is None and "No space left on device" in str(error):  # pyarrow drops the errno
        reason = DISK_ERRORS[errno.ENOSPC]
    if reason is None:
        return None
    code = f" (Errno {error.errno})" if error.errno else ""
    return OutputError(f"cannot write {what}: {reason}{code}. Free space or pick a writable location, then rerun.")


@contextmanager
def atomic_output(output: str | os.PathLike, stage: str, columns: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary directory to write the whole output into; move it to `output` only on success.

    Call `check_output` first. `columns` are the columns poft computed (recorded in the marker, so a
    later stage knows which columns are its own to replace).
    """
    out = Path(output).expanduser().absolute()
    if out.is_symlink():  # replace what the link points to, and keep the link
        out = out.resolve()
    _recover(out)
    if out.is_dir() and any(out.iterdir()) and not (is_poft_output(out) or _is_saved_dataset(out)):
        raise OutputError(
            f"--output {output} is a non-empty folder that is not a poft output; poft never replaces it."
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if _renamable(out):
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}{_owner()}-", dir=out.parent))
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_TAG}{_owner()}-", dir=out))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0o700 would make the output private
    except OSError as error:
        raise disk_error(error, f"--output {output}") or error from error
    try:
        yield tmp
        write_marker(tmp, stage, columns)
        _fsync_tree(tmp)
        _swap_in(tmp, out)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            translated = disk_error(error, f"--output {output}")
            if translated is not None:
                raise translated from error
        raise
    logger.info("Wrote %s", out)


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary sibling of `path`, then rename it over `path`: readers see the old file or the new.

    The sibling keeps `path`'s suffix (a plot's file name names its image format) and carries this process's
    id, so a later write in that folder deletes what a killed run left (and restores an output it renamed aside).
    The file gets the mode of the file it replaces, or a new file's usual mode (0o666 less the umask), not
    mkstemp's private 0o600.
    """
    path = Path(path)
    _restore_asides(path.parent)
    _remove_dead_temporaries(path.parent)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~current_umask()
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}{_owner()}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # a full disk mid-write: no half-written file left beside the output
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write one UTF-8 text file atomically (see `atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _renamable(out: Path) -> bool:
    """Whether `out` can be replaced by a rename: not an existing mount point nor a folder in a read-only parent."""
    return not out.is_dir() or not (os.path.ismount(out) or not os.access(out.parent, os.W_OK))


def _swap_in(tmp: Path, out: Path) -> None:
    if tmp.parent == out:
        _fill_in_place(tmp, out)
        return
    try:
        if not out.exists():
            os.rename(tmp, out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp)  # now the old output
        else:
            aside = out.parent / f".{out.name}{OLD_TAG}{_owner()}"
            os.rename(out, aside)
            os.rename(tmp, out)
            shutil.rmtree(aside)
    except OSError as error:
        if error.errno != errno.EBUSY:
            raise
        logger.warning("%s cannot be renamed (a mount point?); filling it in place, one file at a time", out)
        _fill_in_place(_stage_inside(tmp, out), out)
        return
    _fsync_dir(out.parent)


def _stage_inside(tmp: Path, out: Path) -> Path:
    """Move (or, across file systems, copy) the complete new output `tmp` into a temporary inside `out`."""
    staging = out / f"{TMP_TAG}{_owner()}-copy"
    try:
        os.rename(tmp, staging)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        try:
            shutil.copytree(tmp, staging)
            _fsync_tree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(tmp)
    return staging


def _fill_in_place(complete: Path, out: Path) -> None:
    """Replace the contents of `out` with those of `complete`, a whole new output inside it, by renames alone.

    `complete` is renamed to its STAGED name first, then to its MOVING name once out's old entries are
    gone (the marker first), and its entries are moved up, the marker last: a run killed at any point
    leaves a name that tells the next run's `_recover` where to pick up (`_finish_filling`).
    """
    staged = out / f"{TMP_TAG}{_owner()}{STAGED}"
    os.rename(complete, staged)
    _finish_filling(staged, out)


def _finish_filling(staged: Path, out: Path) -> None:
    if staged.name.endswith(STAGED):
        (out / MARKER).unlink(missing_ok=True)  # from here on, out is no longer the old output
        for entry in out.iterdir():
            if not entry.name.startswith(TMP_TAG):
                _remove(entry)
        moving = staged.with_name(staged.name[: -len(STAGED)] + MOVING)
        os.rename(staged, moving)
        staged = moving
    for entry in sorted(staged.iterdir(), key=lambda e: e.name == MARKER):  # the marker last
        os.rename(entry, out / entry.name)
    staged.rmdir()
    _fsync_dir(out)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _recover(out: Path) -> None:
    """Undo what killed runs left: finish filling `out` in place, restore an aside old output (of `out` or of any
    sibling), and delete dead runs' temporaries inside `out` and beside it, whichever output they were for."""
    if out.is_dir() and not out.is_symlink():
        for leftover in sorted(out.glob(f"{TMP_TAG}*")):
            if leftover.name.endswith((STAGED, MOVING)) and not _alive(_owner_of(leftover.name, TMP_TAG)):
                _finish_filling(leftover, out)
                logger.warning("Finished filling %s from %s, left by a run killed while writing it", out, leftover)
        _remove_dead_temporaries(out)
    if not out.parent.is_dir():
        return
    _restore_asides(out.parent)
    _remove_dead_temporaries(out.parent)


def _restore_asides(folder: Path) -> None:
    """Put back each output in `folder` that a killed run renamed aside and did not replace (the kill fell between
    the fallback path's two renames); delete the aside copy where the new output made it in."""
    for leftover in sorted(folder.glob(f".*{OLD_TAG}*")):
        owner = _owner_of(leftover.name, OLD_TAG)
        if _alive(owner):
            continue
        original = folder / leftover.name[1 : -len(OLD_TAG + owner)]
        if original.exists():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            os.rename(leftover, original)
            logger.warning("Restored %s from %s, left by a run killed while replacing it", original, leftover)


def _remove_dead_temporaries(folder: Path) -> None:
    """Delete the temporaries in `folder` (of any output, folders or files) whose writing process is gone; a whole
    output being filled in place is left to `_recover`, which finishes it."""
    for leftover in folder.glob(f"*{TMP_TAG}*"):
        if leftover.name.endswith((STAGED, MOVING)) or _alive(_owner_of(leftover.name, TMP_TAG)):
            continue
        _remove(leftover)
        logger.info("Removed %s, the unfinished output of a run that was killed", leftover)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _owner() -> str:
    """How temporaries name their writer: its process id and a digest of its host's name. Only the host that wrote
    a temporary judges whether its writer is gone: a process id means nothing on another host or container."""
    return f"{os.getpid()}.{_host()}"


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _owner_of(name: str, tag: str) -> str:
    """The writer (`_owner`) in a temporary's name (`...{tag}{owner}[-...]`)."""
    return name.rsplit(tag, 1)[1].split("-", 1)[0]


def _alive(owner: str) -> bool:
    """Whether the writer `owner` may still be running: True unless it ran on this host and its process is gone."""
    pid, _, host = owner.partition(".")
    if host and host != _host():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ValueError:
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    """Flush the new output's files before it becomes visible, so a power cut cannot expose empty files."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
