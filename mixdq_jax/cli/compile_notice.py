"""The ``mixdq`` command's "compiling ..." line before a big program's first call.

The library marks such calls with events (`mixdq_jax.compile_events`); while a command runs,
:class:`CompileNotice` listens, prints one line on stderr (what compiles, and how long it
took the last time this program compiled for the same shapes here, or that it is not known
yet), sums JAX's own compile events of that call (tracing, lowering to XLA, the XLA compile or
a persistent-cache load) and keeps the total in a small JSON file for next time.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from tqdm import tqdm

from mixdq_jax.io_utils import atomic_write_json

# JAX's compile events (jax._src.dispatch and compiler): the jaxpr trace (top level only),
# lowering to an MLIR module, the XLA compile, or a load from the persistent cache.
_COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
        "/jax/compilation_cache/cache_retrieval_time_sec",
    }
)


def record_path() -> Path:
    """``$MIXDQ_CACHE_DIR/compile_times.json`` (default ``$XDG_CACHE_HOME/mixdq-jax``, or
    ``~/.cache/mixdq-jax``, or the temp folder without a home)."""
    folder = os.environ.get("MIXDQ_CACHE_DIR")
    if not folder:
        try:
            cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        except RuntimeError:  # no home directory
            cache = tempfile.gettempdir()
        folder = Path(cache) / "mixdq-jax"
    return Path(folder) / "compile_times.json"


class CompileNotice:
    """While entered, announce each marked first call on ``stream`` (prefixed ``name``) and
    record its compile seconds in ``path`` (keyed by program and argument signature).

    The record is a hint: an unreadable or unwritable file is ignored.
    """

    def __init__(self, name: str, path: Path | None = None, stream: TextIO | None = None) -> None:
        self.name = name
        self.path = record_path() if path is None else path
        self.stream = sys.stderr if stream is None else stream
        self._key: str | None = None
        self._seconds = 0.0

    def __enter__(self) -> CompileNotice:
        from jax import monitoring  # noqa: PLC0415  (keeps `import mixdq_jax.cli` light)

        monitoring.register_event_listener(self._on_event)
        monitoring.register_event_duration_secs_listener(self._on_duration)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from jax import monitoring  # noqa: PLC0415

        monitoring.unregister_event_listener(self._on_event)
        monitoring.unregister_event_duration_listener(self._on_duration)

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _on_event(self, event: str, **kwargs: Any) -> None:
        from mixdq_jax.compile_events import END, START  # noqa: PLC0415

        if event == START:
            self._key = f"{kwargs['program']}|{kwargs['signature']}"
            self._seconds = 0.0
            last = self._read().get(self._key)
            if not isinstance(last, int | float):
                when = "time not known yet: measured for next time"
            else:
                when = f"about {max(last, 1):.0f} s last time here"
            line = f"{self.name}: compiling {kwargs['program']} (first call; {when})"
            tqdm.write(line, file=self.stream)  # on its own line, above a running progress bar
            self.stream.flush()
        elif event == END and self._key is not None:
            data = self._read()
            data[self._key] = round(self._seconds, 3)
            self._key = None
            try:
                atomic_write_json(self.path, data)
            except OSError:
                pass

    def _on_duration(self, event: str, seconds: float, **kwargs: Any) -> None:
        if self._key is not None and event in _COMPILE_EVENTS:
            self._seconds += seconds
