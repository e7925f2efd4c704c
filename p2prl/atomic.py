"""The one way p2prl writes a file: a temp file beside it, fsync, rename, fsync of the directory.

A reader (or a run resumed after a crash or power cut) sees the old file or the new one, never half of
one. Checkpoints, metrics.jsonl rewrites, summary.json, eval.json and the benchmark's JSON all go
through `write_atomic`; videos, which moviepy writes, reach their place through `move_atomic`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any, Callable, Union

Content = Union[bytes, str, Callable[[IO[bytes]], None]]


def write_atomic(path: Path, content: Content) -> None:
    """Write `content` (bytes, text, or a function writing to a binary file) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an interrupted write leaves no temp file behind
        tmp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


def move_atomic(src: Path, path: Path) -> None:
    """Put a finished file that another library wrote (a video) at `path` atomically: fsync, rename.
    `src` must be on the same filesystem (a temp dir beside `path`)."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, path)
    _sync_dir(Path(path).parent)


def _sync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def jsonable(x: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars as numbers, non-finite floats as null."""
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 0) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(jsonable(obj), indent=2) + "\n")
