"""Output folders: checked before any work, claimed by one run at a time, swapped in atomically.

Every verb that writes a folder (``compress``, ``finetune``, ``export``) goes through here:

- :func:`check_out_dir` refuses, before anything is loaded, an ``--out`` that exists without
  ``--overwrite``, is a file, is the current folder or one above it, or lies where nothing can be
  written (read-only, no permission); then it *claims* the folder: an exclusive ``flock`` on a lock
  file beside it, held until the process ends, so a second run to the same ``--out`` stops at once
  with one line instead of silently replacing the first run's result. Leftovers of killed runs
  (``.NAME.tmp-*``, ``.NAME.old-*``) are removed once the claim is held.
- :func:`make_temp_dir` creates the temporary folder the result is written into, beside ``--out``,
  with the permissions the user's umask gives (not ``mkdtemp``'s 0700).
- :func:`swap_in` renames it into place atomically: ``renameat2(RENAME_NOREPLACE)`` when ``--out``
  must not exist, ``renameat2(RENAME_EXCHANGE)`` when an old folder is replaced, so that at every
  instant ``--out`` is either the old folder or the new one (a crash leaves the other copy in a
  ``.NAME.tmp-*`` folder, removed by the next run). Where ``renameat2`` is missing (not Linux, or a
  file system without it), two renames are used instead.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import functools
import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import CheckpointError

log = logging.getLogger(__name__)

_HELD: dict[Path, int] = {}  # claimed output folders of this process -> lock file descriptor
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_dir(out: str | Path, overwrite: bool, *, claim: bool = True) -> Path:
    """Fail early (before any work) when ``out`` may not or cannot be written; then claim it for
    this process (see the module's text). Returns ``out`` as given (user-expanded)."""
    out = Path(out).expanduser()
    full = out.resolve()
    here = Path.cwd().resolve()
    if full == here or full in here.parents:
        raise CheckpointError(f"--out {str(out)!r} is the current folder or one above it, which would be replaced; "
                              "choose a new folder, e.g. --out out/ck")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {str(out)!r} is a file; choose a folder for --out, e.g. --out out/ck")
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it "
                              f"or choose another --out, e.g. --out {out}-2")
    base = _nearest_existing(full.parent)
    if not base.is_dir():
        raise CheckpointError(f"cannot create --out {str(out)!r}: {base} is a file; choose another --out, e.g. "
                              f"--out {base.parent / Path(out).name}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write to {base} (read-only or no permission); choose another --out, "
                              "e.g. one under your home folder")
    if claim:
        claim_dir(full)
    return out


def claim_dir(out: str | Path) -> None:
    """Hold ``out`` for this process (an exclusive lock beside it) and remove what killed runs left
    there; a second process that tries gets one line and exit 2."""
    full = Path(out).expanduser().resolve()
    if full in _HELD:
        return
    lock = full.parent / f".{full.name}.lock"
    try:
        full.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~umask()))
    except OSError as e:
        raise CheckpointError(f"cannot write to {full.parent} ({e.strerror or e}); choose another --out, e.g. one "
                              "under your home folder") from None
    for _ in range(10):  # the lock file may be replaced between open and flock (see release)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(f"another lqkit run is writing {full}; wait for it to finish or choose another "
                                  "--out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise CheckpointError(f"could not claim {full} (its lock file {lock} keeps changing); try again")
    _HELD[full] = fd
    for left in sorted(glob.glob(glob.escape(str(full.parent / f".{full.name}")) + ".tmp-*")
                       + glob.glob(glob.escape(str(full.parent / f".{full.name}")) + ".old-*")):
        log.info("removing %s, left by an earlier run that was killed", left)
        shutil.rmtree(left, ignore_errors=True)


@atexit.register
def _release_all() -> None:
    for full in list(_HELD):
        release(full)


def release(out: str | Path) -> None:
    """Give up the claim on ``out`` (the lock file is removed; process exit releases it too)."""
    full = Path(out).expanduser().resolve()
    fd = _HELD.pop(full, None)
    if fd is None:
        return
    Path(full.parent / f".{full.name}.lock").unlink(missing_ok=True)
    os.close(fd)


def check_free_space(out: str | Path, nbytes: int) -> None:
    """Refuse to start writing ``nbytes`` where the disk has not that much room (with a margin for the
    JSON, config and tokenizer)."""
    base = _nearest_existing(Path(out).expanduser().resolve().parent)
    free = shutil.disk_usage(base).free
    need = int(nbytes * 1.01) + (32 << 20)
    if free < need:
        raise CheckpointError(f"the checkpoint needs about {need / 2**30:.2f} GiB but {base} has {free / 2**30:.2f} "
                              "GiB free; free space or choose another --out")


def make_temp_dir(out: Path) -> Path:
    """An empty folder beside ``out`` for the result, readable as the user's umask allows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


@functools.cache
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2; False when the system or file system lacks it (then the caller falls back)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(e, os.strerror(e), str(dst))


def swap_in(src: Path, dst: Path, overwrite: bool) -> None:
    """Rename the finished folder ``src`` to ``dst`` atomically (see the module's text)."""
    if not dst.exists() or not overwrite:
        try:
            if _rename2(src, dst, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            raise CheckpointError(f"output folder {str(dst)!r} appeared while this run was working; pass "
                                  f"--overwrite to replace it or choose another --out, e.g. --out {dst}-2") from None
        if dst.exists():
            raise CheckpointError(f"output folder {str(dst)!r} appeared while this run was working; pass "
                                  f"--overwrite to replace it or choose another --out, e.g. --out {dst}-2")
        os.rename(src, dst)
        return
    if _rename2(src, dst, _RENAME_EXCHANGE):  # dst is now the new folder, src the old one
        shutil.rmtree(src, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
    os.rename(dst, old / "x")
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)
