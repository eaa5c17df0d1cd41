"""Writing results safely: a temporary file in the same folder, fsync, then one rename.

Every output freezeguard writes (mask files, learner states, reports, fine-tuned UNets) goes
through here, so an interrupted run, a full disk or a crash leaves either the previous result or
the new one, never half of one and never neither. Temporary names are unique (``mkstemp``), so
two processes writing the same path do not trample each other's temporary file, and the final
file gets the permissions the user's umask gives a new file (``mkstemp`` alone would give 0600,
which is wrong for a file meant to be published).

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out.txt")
    >>> write_text(path, "hello\\n")
    >>> open(path).read()
    'hello\\n'
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator, Mapping

__all__ = ["atomic_path", "write_bytes", "write_text", "replace_dir", "fsync_dir", "default_file_mode",
           "OutputError", "check_outputs"]


class OutputError(ValueError):
    """An output that cannot be written, or that would overwrite or land inside an input."""


def check_outputs(outputs: Mapping[str, str | os.PathLike | None],
                  inputs: Mapping[str, str | os.PathLike | None] = {},  # noqa: B006 (read only)
                  *, parents: bool = False) -> None:
    """Check, before any work, that each output can be written and touches no input.

    ``outputs`` and ``inputs`` map a command-line flag to its path (None: not given). An output's
    folder must exist and be writable (the result is renamed into it); an output may not be an
    input, lie inside an input folder (a mask written into the released pipeline, a report into
    the training images) or be a folder holding an input (replacing it would delete the input),
    and two outputs may not be the same path. With ``parents=True`` (outputs whose missing folders
    the command creates) the nearest existing folder above an output must be writable instead.
    Raises :class:`OutputError` naming the flags.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "sd15").mkdir()
        >>> check_outputs({"--out": root / "mask.safetensors"}, {"--model": root / "sd15"})
        >>> check_outputs({"--out": root / "sd15" / "mask.safetensors"}, {"--model": root / "sd15"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        freezeguard.core.files.OutputError: --out ... lies inside --model ...; write it somewhere else
    """
    given_inputs = {flag: Path(p).resolve() for flag, p in inputs.items() if p is not None}
    seen: dict[Path, str] = {}
    for flag, raw in outputs.items():
        if raw is None:
            continue
        path = Path(raw)
        folder = path.parent
        while parents and not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise OutputError(f"{flag} {path}: folder {folder} does not exist" if not folder.exists()
                              else f"{flag} {path}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {path}: folder {folder} is not writable")
        key = path.resolve()
        if key in seen:
            raise OutputError(f"{flag} and {seen[key]} are the same file ({path}); one would overwrite the other")
        seen[key] = flag
        for in_flag, source in given_inputs.items():
            if key == source:
                raise OutputError(f"{flag} {path} is {in_flag}; it would be overwritten")
            if source in key.parents:
                raise OutputError(f"{flag} {path} lies inside {in_flag} {inputs[in_flag]}; write it somewhere else")
            if key in source.parents:
                raise OutputError(f"{flag} {path} holds {in_flag} {inputs[in_flag]}; replacing it would delete "
                                  "that input")


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file under the current umask (e.g. 0644)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temporary path next to ``path``; on success fsync it and rename it over ``path``.

    The caller writes the file (by any means: ``save_file``, ``fig.savefig``...). On an exception
    the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, default_file_mode())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def replace_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Replace folder ``path`` by a new one that ``fill(tmp_folder)`` writes, never losing both.

    The new folder is written and fsynced beside ``path`` first; only then is the old one moved
    aside, the new one renamed into place and the old one removed. If ``fill`` fails, ``path``
    is untouched. Returns ``path``.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, _dir_mode())
        fill(tmp)
        _follow_umask(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _follow_umask(root: Path) -> None:
    """Give every file and folder under ``root`` the mode a new one gets under the umask.

    Libraries write through ``mkstemp`` (0600) and ``copy2`` keeps a source's mode; a published
    folder should read like any other the user creates (e.g. 0644 files, 0755 folders).
    """
    file_mode, dir_mode = default_file_mode(), _dir_mode()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), dir_mode)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), file_mode)


def _dir_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask
