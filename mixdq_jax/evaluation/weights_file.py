"""Reading a released evaluation network's weights: safetensors or ``.npz`` with numpy, a
PyTorch ``.pth``/``.pt`` with torch (the optional ``[eval]`` extra), one function for all.

A file that does not parse (truncated download, wrong file) is a ``ValueError`` naming it and
saying to fetch it again, whatever the reader raised (torch's own errors name no file); torch
missing for a ``.pth`` is a `MissingDependencyError`. Both are input or environment errors:
``mixdq`` reports them with exit 2 before any image is generated (`evaluation.run`
checks every requested metric's weights first)."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from weights_convert.safetensors_io import load_safetensors

# what a damaged file makes the readers raise (torch: RuntimeError "PytorchStreamReader ...",
# pickle and zip errors; numpy: BadZipFile, ValueError, EOFError)
_PARSE_ERRORS = (ValueError, RuntimeError, EOFError, KeyError, TypeError, AttributeError,
                 pickle.UnpicklingError, zipfile.BadZipFile)  # fmt: skip


class MissingDependencyError(OSError):
    """An optional package a file needs is not installed (an environment problem, not a bug:
    an ``OSError``, so the command line reports it as bad environment, exit 2)."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``{name: float32 array}`` of a weights file. A torch checkpoint that wraps its tensors
    in ``{"state_dict": ...}`` is unwrapped; entries that are not tensors are dropped."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return dict(load_safetensors(path))
        if suffix == ".npz":
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        return _read_torch(path, suffix)
    except (MissingDependencyError, FileNotFoundError, PermissionError):
        raise
    except _PARSE_ERRORS as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        detail = detail.split(". ")[0] if len(detail) > 120 else detail  # torch's advice: cut
        if str(path) in detail:  # the reader named the file already (safetensors)
            raise ValueError(f"{detail}; download the file again") from err
        raise ValueError(
            f"{path}: not a readable {suffix or 'weights'} file ({type(err).__name__}: "
            f"{detail}); the download may be truncated: fetch it again"
        ) from err


def _read_torch(path: Path, suffix: str) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415  (optional: only the released PyTorch files need it)
    except ImportError as err:
        raise MissingDependencyError(
            f'{path}: reading a PyTorch {suffix} file needs torch: pip install -e ".[eval]" '
            "(or save its tensors once as .safetensors with the same names)"
        ) from err
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a state dict (a mapping of tensor names to tensors)")
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
