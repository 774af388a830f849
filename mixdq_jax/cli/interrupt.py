"""Ctrl-C while the ``mixdq`` command waits on a running XLA computation.

A running XLA computation cannot be cut short, and the process cannot end before it returns
(measured on XLA:CPU: a SIGINT 1 s into a 9 s call raised ``KeyboardInterrupt`` at once in
``block_until_ready`` but only after the call in ``np.asarray``, and either way the process
exited 9 s after the signal); on SDXL one call is a whole UNet evaluation or sampling loop,
tens of seconds on a CPU. So :class:`InterruptWatch` learns of the signal at once
(``signal.set_wakeup_fd``, read by a thread), says after a second that the command is waiting
for the computation, and a second Ctrl-C ends the process at once with exit code 130. That is
as safe as a kill: every result file is written atomically and the run-directory locks are
``flock``s.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from types import TracebackType
from typing import TextIO

_SAY_AFTER_S = 1.0  # a command that stops by itself within this time prints nothing extra
_POLL_S = 0.1


class InterruptWatch:
    """While entered (in the main thread): the behaviour above, messages prefixed ``name``."""

    def __init__(self, name: str, stream: TextIO | None = None) -> None:
        self.name = name
        self.stream = sys.stderr if stream is None else stream
        self._done = threading.Event()
        self._interrupted = threading.Event()
        self._thread: threading.Thread | None = None
        self._fds: tuple[int, int] | None = None
        self._previous = -1

    def __enter__(self) -> InterruptWatch:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only: nothing to watch
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._fds = (read, write)
        self._previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="mixdq-interrupt", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fds is None or self._interrupted.is_set():
            return  # interrupted: the process is ending; keep watching while XLA finishes
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        signal.set_wakeup_fd(self._previous)
        for fd in self._fds:
            os.close(fd)
        self._fds = None

    def _say(self, text: str) -> None:
        print(f"\n{self.name}: {text}", file=self.stream, flush=True)

    def _watch(self) -> None:
        assert self._fds is not None
        read = self._fds[0]
        first: float | None = None
        said = False
        while not self._done.is_set():
            ready, _, _ = select.select([read], [], [], _POLL_S)
            if ready:
                count = os.read(read, 64).count(signal.SIGINT)
                if count and (first is not None or count > 1):
                    self._say("quitting now (exit 130); results already written are kept")
                    os._exit(130)
                if count:
                    first = time.monotonic()
                    self._interrupted.set()
            waited = first is not None and time.monotonic() - first > _SAY_AFTER_S
            if waited and not said and not self._done.is_set():
                self._say(
                    "waiting for the running XLA computation to return (it cannot be cut "
                    "short); press Ctrl-C again to quit now"
                )
                said = True
