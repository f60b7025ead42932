"""The run folder's files on disk: written atomically (readers see the old file or the new, never a torn one),
weights read without unpickling code, CSV logs and Markdown sections."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: Path, data: bytes | str):
    """Write to a temporary file in the same folder, flush, fsync, rename: readers see old or new, never torn."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should read like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # fsync and write errors come without one
        raise


def save_atomic(obj, path: Path):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


class CheckpointError(ValueError):
    """A weights file that cannot be used: unreadable, asking to run code, or made for another model."""


def load_weights(path: Path):
    """A checkpoint or state_dict, read without unpickling code (tensors, numbers, strings, containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # a truncated zip, random bytes, a pickle of code: torch raises many kinds
        lines = str(e).splitlines() or [""]
        code = next((line.strip() for line in lines if "GLOBAL" in line), None)  # weights_only names the callable
        if code:
            raise CheckpointError(f"{path}: refused, it is not a plain weights file and would run code on loading "
                                  f"({code}); nothing was executed") from None
        raise CheckpointError(f"{path}: not a readable torch weights file, truncated or corrupt "
                              f"({type(e).__name__}: {lines[0][:120]})") from None


def load_into(model: nn.Module, state: dict, source: str):
    """`model.load_state_dict(state)`, with a one-line error saying how `source` does not fit the model."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: not a state_dict (a dict of tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"{source} was saved from a different model ({len(problems)} problem(s); first: "
                              f"{problems[0][:200] if problems else e})") from None


def write_csv(path: Path, rows: list[dict]):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    out = csv.DictWriter(buffer, columns)
    out.writeheader()
    out.writerows(rows)
    write_atomic(path, buffer.getvalue())


def write_section(path: Path, name: str, text: str):
    """Replace the `name` section of a Markdown file (between HTML-comment markers), adding it if missing."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else \
        "# Results\n\nMeasured figures; each section is written by the command it names.\n"
    block = f"{start}\n{text}\n{end}"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    write_atomic(path, new)
