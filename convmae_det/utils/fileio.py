"""Writing files so that a reader never sees half of one."""
import contextlib
import os
from typing import IO, Iterator

__all__ = ["atomic_write"]


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
