"""Write outputs so that a reader never sees a half-written result.

Every stage that produces a directory (heads, converted checkpoints, engines, Triton repos,
reports) writes into a hidden temporary sibling, ``.<name>.tmp-<pid>-*``, and puts it in place only
when complete: files and directory are fsynced, then the new directory is renamed in, or, when
replacing an old one, exchanged with it in one ``renameat2(RENAME_EXCHANGE)`` call (Linux), so at
every instant ``out`` is either the old directory or the new one. Where the exchange is not
available the old directory is renamed aside first; a crash in that instant leaves it as
``.<name>.tmp-old-<pid>``, which the next run puts back before anything else.

An interrupted or killed run leaves the previous output untouched and at most a temporary sibling,
which readers never look at (its name starts with a dot and says ``tmp``) and the next run of a
writer of the same output removes (only those of processes that are no longer running).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medusa_forge.errors import ForgeError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync(path: str | Path) -> None:
    """Flush one file or directory to disk (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk (what a rename cannot promise on its own)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                _fsync(path)
        _fsync(dirpath)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of ours may be writing it right now (our failed writers clean up after themselves)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _owner(stale: Path, out: Path) -> int | None:
    """The pid in a temporary sibling's name (``.<name>.tmp-<pid>-...`` / ``.<name>.tmp-old-<pid>``)."""
    m = re.match(r"(?:old-)?(\d+)(?:-|$)", stale.name[len(_temp_prefix(out)) :])
    return int(m.group(1)) if m else None


def recover(out: str | os.PathLike) -> None:
    """Undo what a crash can leave of a writer of ``out``: put back an old directory that was renamed
    aside and not replaced, and remove the temporary siblings of writers that are no longer running."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return
    stale = sorted(out.parent.glob(f"{_temp_prefix(out)}*"))
    dead = [s for s in stale if (pid := _owner(s, out)) is None or not _pid_alive(pid)]
    if not out.exists():
        for s in dead:
            if s.name.startswith(f"{_temp_prefix(out)}old-") and s.is_dir():
                with contextlib.suppress(OSError):
                    os.rename(s, out)  # the complete previous output, renamed aside by a writer that died
                    dead.remove(s)
                    break
    for s in dead:
        if s.is_dir() and not s.is_symlink():
            shutil.rmtree(s, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                s.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, out: Path) -> None:
    """Put the complete ``tmp`` at ``out``; ``out`` is the old or the new directory at every instant."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
        return
    old = out.parent / f"{_temp_prefix(out)}old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block finishes without error.

    ``out`` must not exist, be empty, or ``overwrite`` must be set; then the old directory is
    replaced only once the new one is complete (see the module docstring).
    """
    out = Path(out).absolute()
    recover(out)
    if out.exists() and not out.is_dir():
        raise ForgeError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ForgeError(f"output directory {out} is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(out)}{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file via a temporary sibling and ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
