"""Writing output directories safely: one writer per target, an atomic swap, the user's umask.

A target ``runs/x`` is claimed with an exclusive ``flock`` on ``runs/.x.lock`` from the moment
its existence is checked (before any costly work) until the new contents are in place, so two
processes writing the same output cannot both succeed: the second is told at once. Claiming also
proves the location is writable and clears leftovers (``.x.partial-*``, ``.x.old-*``) of
writers that were killed.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import stat
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from secateurs.errors import OutputError, OutputExistsError

log = logging.getLogger(__name__)

_HELD: dict[Path, int] = {}  # absolute target -> file descriptor of its held lock


def _key(target: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(target)))


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def claim(target: str | os.PathLike, wait: bool = False) -> Path:
    """Hold the exclusive lock of ``target`` (re-entrant in this process); return its path.

    ``wait``: block until another writer is done (caches) instead of failing at once.
    """
    key = _key(target)
    if key in _HELD:
        return key
    try:
        key.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"Cannot create the folder {key.parent}: {err.strerror}.") from err
    _HELD[key] = _locked_fd(key, wait)
    _remove_leftovers(key)
    return key


def _locked_fd(key: Path, wait: bool) -> int:
    path = lock_path(key)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise OutputError(
                f"Cannot write to {key.parent} ({err.strerror}); choose another output location."
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputError(
                f"Another secateurs process{f' (pid {owner})' if owner else ''} is writing "
                f"{key}; wait for it to finish or choose another output."
            ) from None
        if _same_file(fd, path):  # the previous holder may have unlinked it after our open
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def release(target: str | os.PathLike) -> None:
    """Give up the lock of ``target`` (no-op if this process does not hold it)."""
    key = _key(target)
    fd = _HELD.pop(key, None)
    if fd is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path(key))
    os.close(fd)


@atexit.register
def _release_all() -> None:
    """A process that stops before writing (a refused spec, an error, Ctrl-C) leaves no lock
    file beside its target."""
    for key in list(_HELD):
        release(key)


def _remove_leftovers(key: Path) -> None:
    prefixes = (f".{key.name}.partial-", f".{key.name}.old-")
    for name in os.listdir(key.parent):
        if name.startswith(prefixes):
            log.info("Removing %s, left by an interrupted writer", key.parent / name)
            shutil.rmtree(key.parent / name, ignore_errors=True)


def check_output_dir(out: str | os.PathLike, overwrite: bool, wait: bool = False) -> Path:
    """Fail early (before any costly work) if ``out`` may not be written; then claim it."""
    path = Path(out)
    _check_existing(path, overwrite)
    claim(path, wait)
    try:
        _check_existing(path, overwrite)  # another writer may have finished meanwhile
    except OutputExistsError:
        release(path)
        raise
    return path


def _check_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"Output directory {path} exists; pass --overwrite (from Python: overwrite=True) to "
            "replace it."
        )
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"Output path {path} exists and is not a directory.")


def check_disk_space(out: str | os.PathLike, needed: int) -> None:
    """Refuse before writing if the output's file system has less than ``needed`` bytes free."""
    key = _key(out)
    folder = next(p for p in (key, *key.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(_space_message(key, needed, free))


def _space_message(key: Path, needed: int, free: int | None) -> str:
    have = f"; {free / 1e9:.2f} GB free" if free is not None else ""
    return (
        f"Not enough disk space to write {key}: it needs about {needed / 1e9:.2f} GB{have} "
        f"in {key.parent}. Free some space or choose another output."
    )


@contextmanager
def atomic_directory(
    out: str | os.PathLike, overwrite: bool = False, needed: int = 0, wait: bool = False
) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out`` only if the block succeeds.

    A crash or Ctrl-C inside the block leaves ``out`` as it was (absent, or the old contents);
    Ctrl-C during the swap is held until the swap and the old copy's removal are complete.
    ``needed``: bytes the block will write, checked against free space first.
    """
    target = check_output_dir(out, overwrite, wait)
    try:
        if needed:
            check_disk_space(target, needed)
        tmp = _new_sibling(target)
        try:
            yield tmp
            follow_umask(tmp)
            with interrupts_deferred():
                _swap_into_place(tmp, target)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno == errno.ENOSPC:
                free = shutil.disk_usage(target.parent).free
                raise OutputError(_space_message(_key(target), needed or 0, free)) from err
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        release(target)


def _new_sibling(target: Path) -> Path:
    """A fresh hidden sibling of ``target``, created with the user's umask (not 0700)."""
    path = target.with_name(f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    path.mkdir()
    return path


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give everything under ``root`` the permissions a plain ``open``/``mkdir`` would: some
    writers (safetensors' temporary files, ``tempfile``) create 0600 / 0700 entries, which made
    outputs readable by their owner only whatever the user's umask."""
    mask = current_umask()
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):  # an executable stays executable (as 0777 & ~umask)
                os.chmod(path, (0o777 if mode & 0o111 else 0o666) & ~mask)


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT until the block is done, then raise ``KeyboardInterrupt`` if one came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if received:
        raise KeyboardInterrupt
