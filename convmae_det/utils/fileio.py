"""Writing files so that a reader never sees half of one."""
import contextlib
import errno
import logging
import os
import re
import shutil
from typing import IO, Iterator, List

__all__ = ["atomic_write", "atomic_link", "remove_stale_temp_files", "same_file"]

logger = logging.getLogger("convmae_det")
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")  # what atomic_write names its temporary files
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class _ErrorRecorder:
    """A file object that remembers the first OSError of a write: torch.save turns one into a
    RuntimeError ("unexpected pos ..."), which no longer says that the disk is full."""

    def __init__(self, f: IO):
        self._f, self.error = f, None

    def _call(self, name, *args):
        try:
            return getattr(self._f, name)(*args)
        except OSError as e:
            self.error = self.error or e
            raise

    def write(self, data):
        return self._call("write", data)

    def writelines(self, lines):
        return self._call("writelines", lines)

    def flush(self):
        return self._call("flush")

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing and rename it over ``path`` when the
    block ends without an error; on an error ``path`` keeps its old content (or stays absent)
    and the temporary file is removed. The folder is created if needed. A full disk raises an
    OSError (ENOSPC) that says so and names ``path``, whatever the writer made of it.

        with atomic_write("out/result.json") as f:
            json.dump(result, f)
        with atomic_write("out/model.pth", "wb") as f:
            torch.save(state, f)

    A process killed inside the block leaves its temporary file (``.NAME.tmpPID``) behind;
    :func:`remove_stale_temp_files` removes such files.
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write opens files for writing ('w' or 'wb'), got mode {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    f = None
    try:
        f = _ErrorRecorder(open(tmp, mode))
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        os.replace(tmp, path)
    except Exception as e:
        cause = f.error if f is not None and f.error is not None else e
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            raise OSError(cause.errno, f"no space left on device while writing {path} (it keeps its previous content)") from e
        raise
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def atomic_link(src: str, dst: str) -> None:
    """Make ``dst`` the file ``src`` atomically: a hard link (no second copy on disk; replacing
    either name later leaves the other intact), or, where the filesystem has none, a copy
    written with :func:`atomic_write`."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.link{os.getpid()}")
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as fsrc, atomic_write(dst, "wb") as fdst:
            shutil.copyfileobj(fsrc, fdst)
        return
    try:
        os.replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def remove_stale_temp_files(folder: str) -> List[str]:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` when its process
    was killed mid-write (``.NAME.tmpPID`` whose process no longer runs); returns their paths."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        m = _TEMP.match(name)
        if not m or _process_runs(int(m.group("pid"))):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            removed.append(path)
            logger.info(f"removed {path}, the temporary file of an interrupted write of {m.group('name')}")
    return removed


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (``os.path.samefile`` when both exist: symlinks, hard links
    and relative paths included; the resolved paths otherwise)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)
