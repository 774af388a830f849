"""Reading a released evaluation network's weights: safetensors or ``.npz`` with numpy, a
PyTorch ``.pth``/``.pt`` with torch (the optional ``[eval]`` extra), one function for all."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from weights_convert.safetensors_io import load_safetensors


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``{name: float32 array}`` of a weights file. A torch checkpoint that wraps its tensors
    in ``{"state_dict": ...}`` is unwrapped; entries that are not tensors are dropped."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return dict(load_safetensors(path))
    if suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    try:
        import torch  # noqa: PLC0415  (optional: only the released PyTorch files need it)
    except ImportError as err:
        raise ImportError(
            f'{path}: reading a PyTorch {suffix} file needs torch: pip install -e ".[eval]" '
            "(or save its tensors once as .safetensors with the same names)"
        ) from err
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a state dict (a mapping of tensor names to tensors)")
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
