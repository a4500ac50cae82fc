"""Writes that never leave half a result: a folder (a checkpoint, a package, a Triton repository)
is built beside its destination and renamed into place when complete; a file is written to a
temporary sibling and replaced in one step."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces `out` only when the block completes: a failure
    leaves nothing that looks complete (and `out` as it was)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, atomically: a reader sees the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a package's manifest from other users
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
