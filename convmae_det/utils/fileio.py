"""Writing files so that a reader never sees half of one."""
import contextlib
import os
import shutil
from typing import IO, Iterator

__all__ = ["atomic_write", "atomic_link"]


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing and rename it over ``path`` when the
    block ends without an error; on an error ``path`` keeps its old content (or stays absent)
    and the temporary file is removed. The folder is created if needed.

        with atomic_write("out/result.json") as f:
            json.dump(result, f)
        with atomic_write("out/model.pth", "wb") as f:
            torch.save(state, f)
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write opens files for writing ('w' or 'wb'), got mode {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
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
