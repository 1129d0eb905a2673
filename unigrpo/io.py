"""Atomic file writes: every file the project writes goes through here (a leaf module: it imports nothing
from unigrpo).

One rule for all of them: the bytes go to a temporary file in the destination's own directory (same file
system, so the rename is atomic), the file is flushed and fsynced, then `os.replace` puts it at its name and
the directory is fsynced. A reader sees the old file or the new one, never half of one; a crash leaves at
worst a stray `.tmp-*` file beside it. checkpoint.py builds its directory swap on `fsync`.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

__all__ = ["fsync", "write_atomic", "write_text_atomic", "write_json_atomic", "save_figure", "save_png"]


def fsync(path: str) -> None:
    """fsync a file or a directory (directories: best effort, not every OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[IO], Any], *, binary: bool = False,
                 suffix: str = "") -> str:
    """Call `write(f)` on a temporary file beside `path`, fsync it, rename it over `path`, fsync the
    directory. Creates missing parent directories; an exception deletes the temporary file. `suffix` keeps
    the temporary name's extension for writers that choose the format from it (matplotlib, PIL).
    Returns path."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync(parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """`text` to `path`, atomically. Returns path."""
    return write_atomic(path, lambda f: f.write(text))


def write_json_atomic(path: str | os.PathLike, obj: Any, what: str = "data", indent: int | None = 1) -> str:
    """`obj` as JSON to `path`, atomically; a value JSON cannot hold is a ValueError naming `what`."""
    try:
        text = json.dumps(obj, indent=indent)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not JSON-serialisable: {err}") from None
    return write_text_atomic(path, text)


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """A matplotlib figure to `path` (format from its extension), atomically; closes the figure."""
    import matplotlib.pyplot as plt   # optional dependency: only figure writers need it

    ext = os.path.splitext(path)[1]
    try:
        write_atomic(path, lambda f: fig.savefig(f, dpi=dpi, format=ext[1:] or None), binary=True, suffix=ext)
    finally:
        plt.close(fig)
    return path


def save_png(image, path: str) -> str:
    """A PIL image to `path` as PNG, atomically."""
    return write_atomic(path, lambda f: image.save(f, format="PNG"), binary=True, suffix=".png")
