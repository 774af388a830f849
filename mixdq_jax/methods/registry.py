"""The method registry: every name `mixdq quantize --method` and the study accept.

Built-in methods register when `mixdq_jax.methods` is imported; a researcher's own method
registers from their own file with :func:`register_method`, loaded by
``mixdq quantize --plugin FILE`` (:func:`load_plugin`) or by importing it in Python.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from mixdq_jax.methods.method import Method

_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` under ``method.name``; a taken name is refused unless ``replace``
    or the method is the same one again (equal settings: a plugin file imported twice, by
    path and as a module)."""
    if not isinstance(method, Method):
        raise ValueError(f"register_method takes a Method, got {type(method).__name__}")
    old = _REGISTRY.get(method.name)
    same = old is not None and (old == method or old.settings() == method.settings())
    if old is not None and not same and not replace:
        raise ValueError(
            f"a method named {method.name!r} is already registered ({old.title}); choose "
            "another name or pass replace=True"
        )
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown method {name!r}{hint}; registered: {', '.join(_REGISTRY)}. A method of "
            "your own: --plugin FILE (see examples/custom_method.py)"
        ) from None


def method_names() -> tuple[str, ...]:
    """Registered names, built-in ones first, in registration order."""
    return tuple(_REGISTRY)


def load_plugin(path: str | os.PathLike) -> tuple[str, ...]:
    """Import the Python file ``path`` (which registers methods through this module's
    public API) and return the names it registered. The file runs once per process."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--plugin {path}: no such file")
    if path.suffix != ".py":
        raise ValueError(f"--plugin {path}: expected a Python file (.py)")
    resolved = path.resolve()
    module_name = f"mixdq_plugin_{hashlib.sha1(str(resolved).encode()).hexdigest()[:12]}"
    if module_name in _PLUGINS:
        return _PLUGINS[module_name]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise ValueError(f"--plugin {path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    before = dict(_REGISTRY)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        _REGISTRY.clear()
        _REGISTRY.update(before)
        raise ValueError(
            f"--plugin {path}: importing it failed: {type(err).__name__}: {err}"
        ) from err
    added = tuple(n for n, m in _REGISTRY.items() if before.get(n) is not m)
    if not added:
        raise ValueError(
            f"--plugin {path}: the file registered no method; call "
            "mixdq_jax.methods.register_method(Method(...)) in it"
        )
    _PLUGINS[module_name] = added
    return added


_PLUGINS: dict[str, tuple[str, ...]] = {}  # plugin module -> the names it registered
