"""torchmetrics and torch-fidelity's Inception, imported beside a torch-fidelity package that
cannot import.

torch-fidelity 0.4.0's package ``__init__`` imports every feature extractor and so torchvision,
which cannot be installed beside the CPU torch wheel; torchmetrics imports torch-fidelity's
Inception module whenever torch-fidelity is installed, and that module itself imports only torch
and three small torch-fidelity modules. So while importing, ``torch_fidelity`` is registered as a
bare package (its real folder as ``__path__``, ``__init__`` not run), then ``sys.modules`` is put
back: the reference code the tests compare against is the libraries' own, unmodified, and no
placeholder module stands in for anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


@contextmanager
def _bare_torch_fidelity(required: bool) -> Iterator[None]:
    spec = importlib.util.find_spec("torch_fidelity")
    found = spec is not None and bool(spec.submodule_search_locations)
    assert found or not required, "torch-fidelity not installed (the Makefile installs it)"
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torch_fidelity"}
    if found:
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    try:
        yield
    finally:
        for key in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
            del sys.modules[key]
        sys.modules.update(saved)


def import_torchmetrics() -> ModuleType:
    """The ``torchmetrics`` package, imported as described above."""
    if "torchmetrics" in sys.modules:
        return sys.modules["torchmetrics"]
    with _bare_torch_fidelity(required=False):
        return importlib.import_module("torchmetrics")


def import_fidelity_inception() -> ModuleType:
    """torch-fidelity's ``feature_extractor_inceptionv3`` module (its TF1 resize is the
    module's ``interpolate_bilinear_2d_like_tensorflow1x``)."""
    with _bare_torch_fidelity(required=True):
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
