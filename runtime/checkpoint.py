"""Checkpoints: a model's state dict, optimizer state and metadata in one .npz file.

NumPy alone can open the file (``np.load(path)``); nothing is pickled. Keys:
``model/<name>`` for every state-dict tensor, ``optim/<name>`` for optimizer
state, and ``meta``: UTF-8 JSON bytes (format version, model config, user extras).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import CheckpointError, ShapeError
from .models import build

FORMAT = "sparsefedpp-checkpoint"
VERSION = 1


def file_mode() -> int:
    """0666 minus the process umask: the mode open() would have given the file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, sync it, give it the
    umask mode (mkstemp makes 0600) and rename it over ``path``: a crash never
    leaves a half-written file under the real name. Used for checkpoints and
    ONNX exports."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save(path, model, optimizer=None, meta: dict | None = None) -> Path:
    """Write ``model`` (and optionally ``optimizer``) to ``path`` atomically.

    ``meta`` is any JSON-serialisable dict stored beside the model's build config.
    The file is written to a temporary name and renamed, so a crash never leaves a
    half-written checkpoint under the real name.
    """
    path = Path(path)
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    header = {"format": FORMAT, "version": VERSION, "model": model.config,
              "meta": meta or {}}
    try:
        blob = json.dumps(header).encode()
    except TypeError as err:
        raise CheckpointError(f"checkpoint meta: expected JSON-serialisable values, "
                              f"got {err}") from None
    arrays["meta"] = np.frombuffer(blob, dtype=np.uint8)
    return write_atomic(path, lambda f: np.savez(f, **arrays))


def read(path) -> tuple[dict, dict, dict]:
    """Read and validate a checkpoint file without building a model.

    Returns (header, model_state, optim_state); the header has "model" (the build
    config) and "meta". Raises CheckpointError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: expected a file, got nothing there")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if "meta" not in names:
                raise CheckpointError(f"checkpoint {path}: expected a 'meta' entry, got "
                                      f"only {names[:6]}; not a sparsefedpp checkpoint")
            header = _header(path, z["meta"])
            model_state = {k[6:]: z[k] for k in names if k.startswith("model/")}
            optim_state = {k[6:]: z[k] for k in names if k.startswith("optim/")}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
            KeyError, TypeError) as err:  # TypeError: a plain .npy under this name
        raise CheckpointError(f"checkpoint {path}: expected a complete .npz archive, "
                              f"got a corrupt or truncated file ({err}); save it "
                              "again") from None
    return header, model_state, optim_state


def _header(path, raw) -> dict:
    try:
        header = json.loads(bytes(raw).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: expected JSON metadata, got "
                              f"unreadable bytes ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: expected format '{FORMAT}', got "
                              f"{header.get('format') if isinstance(header, dict) else header!r}")
    if header.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: expected format version {VERSION}, "
                              f"got {header.get('version')!r}; upgrade sparsefedpp")
    if not isinstance(header.get("model"), dict):
        raise CheckpointError(f"checkpoint {path}: expected the model config in its "
                              "metadata, got none")
    return header


def load(path, model=None, optimizer=None):
    """Load a checkpoint into ``model`` (built from the file's config when None).

    Returns (model, meta). Names and shapes are checked before anything is written.
    """
    header, model_state, optim_state = read(path)
    if model is None:
        config = dict(header["model"])
        try:
            model = build(config.pop("name"), **config)
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path}: expected a valid model config, "
                                  f"got {header['model']!r} ({err})") from None
    elif model.config != header["model"]:
        raise CheckpointError(f"checkpoint {path}: expected a checkpoint of "
                              f"{model.config}, got one of {header['model']}")
    try:
        model.load_state_dict(model_state)
    except ShapeError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    if optimizer is not None and optim_state:
        optimizer.load_state_dict(optim_state)
    return model, header["meta"]
