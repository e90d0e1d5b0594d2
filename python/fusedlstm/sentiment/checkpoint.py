"""Files of a model directory, written so that a crash never leaves a half-written one: every
file is written to a hidden temporary beside it, fsynced and renamed over the old one. Arrays
are stored as .npz (NumPy's zip of .npy members) and read back without pickle, their headers
checked before anything is allocated from them.

A model directory holds config.json, vocab.json and weights.npz (MODEL_FILES); a training run
adds metrics.jsonl and state.npz (everything needed to resume). The file format is versioned by
``ModelConfig.format_version``."""

from __future__ import annotations

import io
import json
import os
import secrets
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "MODEL_FILES",
    "CHECKPOINT_FILES",
    "atomic_write",
    "remove_stale_temporaries",
    "npz_bytes",
    "load_npz",
    "write_training_state",
    "read_training_state",
]

MODEL_FILES = ("config.json", "vocab.json", "weights.npz")
CHECKPOINT_FILES = ("config.json", "vocab.json", "weights.npz", "metrics.jsonl", "state.npz")

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def atomic_write(path: os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically: a hidden temporary `.<name>.<random>.tmp` in the same
    directory, fsynced, then renamed over `path`. The temporary is created with mode 0o666 and
    the process umask applies as it would to any new file (the umask is never changed: another
    thread may be creating files meanwhile)."""
    path = Path(path)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, _OPEN_FLAGS, 0o666)
            break
        except FileExistsError:  # a name another writer holds: draw again
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable where the platform allows it (POSIX)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the data itself is synced
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: os.PathLike) -> list[str]:
    """Delete the hidden temporaries a killed run left next to its checkpoint files (only those
    named like ours: `.weights.npz.<random>.tmp`); returns their names."""
    removed = []
    for name in CHECKPOINT_FILES:
        for tmp in Path(directory).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The .npz file of `arrays`, as bytes (for atomic_write)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npz_headers(path: Path) -> dict[str, tuple[tuple, np.dtype]]:
    """{name: (shape, dtype)} of every member, from the .npy headers alone: nothing is
    allocated from a size the file claims before it is checked against what the file holds."""
    out = {}
    fsize = os.path.getsize(path)
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename!r} is not a .npy array")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            name = info.filename[:-4]
            if dtype.hasobject:
                raise ValueError(f"array {name!r} holds Python objects (pickled data)")
            nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            # A stored member's bytes are in the file; deflate expands them at most ~1032x.
            held = min(info.compress_size, fsize)
            if nbytes > (held if info.compress_type == zipfile.ZIP_STORED else 1100 * held):
                raise ValueError(
                    f"array {name!r} claims shape {shape} ({nbytes} bytes), more "
                    f"than its {held} bytes in the file can hold"
                )
            out[name] = (tuple(shape), dtype)
    return out


def load_npz(path: os.PathLike, expected: Mapping[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """All arrays of an .npz: headers checked first (no object arrays, sizes the file can hold,
    exactly the names and shapes of `expected` when given), then read with allow_pickle=False.
    The file is named in every error."""
    path = Path(path)
    try:
        headers = _npz_headers(path)
        for name, shape in (expected or {}).items():
            if name not in headers:
                raise ValueError(f"missing array {name!r}")
            if headers[name][0] != tuple(shape):
                raise ValueError(
                    f"weights[{name!r}]: shape {headers[name][0]}, expected {tuple(shape)} from the config"
                )
        if expected is not None and set(headers) - set(expected):
            raise ValueError(f"unexpected arrays {sorted(set(headers) - set(expected))}")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except ValueError as exc:  # object arrays need pickle: refused
        raise ValueError(f"{path}: refused ({exc})") from None
    except Exception as exc:  # truncated or not a zip
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


def write_training_state(
    out_dir: Path,
    current: Mapping[str, np.ndarray],
    best: Mapping[str, np.ndarray],
    optimizer: Mapping[str, np.ndarray],
    average: Mapping[str, np.ndarray],
    meta: dict,
) -> None:
    """state.npz: the current, best and averaged weights, the optimizer's slots and `meta` (a
    JSON object: epoch, step, early-stopping state, the metrics so far). Written last in a
    checkpoint: it is the commit point that resuming reads."""
    arrays = {f"cur/{k}": v for k, v in current.items()}
    arrays.update({f"best/{k}": v for k, v in best.items()})
    arrays.update({f"opt/{k}": v for k, v in optimizer.items()})
    arrays.update({f"avg/{k}": v for k, v in average.items()})
    arrays["meta"] = np.asarray(json.dumps(meta))
    atomic_write(out_dir / "state.npz", npz_bytes(arrays))


def read_training_state(out_dir: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """({"cur": .., "best": .., "opt": .., "avg": ..} arrays by name, meta) from state.npz."""
    path = Path(out_dir) / "state.npz"
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: no training state ({path.name}) in {out_dir}")
    arrays = load_npz(path)
    groups: dict[str, dict[str, np.ndarray]] = {"cur": {}, "best": {}, "opt": {}, "avg": {}}
    for key, value in arrays.items():
        group, _, name = key.partition("/")
        if group in groups:
            groups[group][name] = value
    try:
        meta = json.loads(str(arrays["meta"]))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: no readable training metadata ({exc})") from None
    return groups, meta
