"""Ctrl-C while the main thread waits on a long XLA computation: said after a second, and a
second Ctrl-C quits at once (Python alone would wait for the computation to return)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.cli.conftest import ROOT

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from mixdq_jax.cli.interrupt import InterruptWatch
    x = jnp.full((384, 384), 0.01)
    body = lambda i, y: jnp.tanh(y @ x)
    work = jax.jit(lambda x: jax.lax.fori_loop(0, 20000, body, x)).lower(x).compile()
    with InterruptWatch("mixdq test"):
        print("running", flush=True)
        np.asarray(work(x))  # about 15 s here; Python sees no signal before it returns
    print("finished", flush=True)
    """
)


def test_a_second_ctrl_c_quits_during_a_running_computation():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    # SIGINT as in a terminal: a shell that starts the test run in the background (`make test &`,
    # CI runners) leaves it ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert proc.stdout.readline() == "running\n"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.6)  # the watcher speaks after 1 s; the computation is still running
        assert proc.poll() is None
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        waited = time.monotonic() - start
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert waited < 2.0, (waited, err)
    assert "waiting for the running XLA computation to return" in err
    assert "press Ctrl-C again to quit now" in err
    assert "mixdq test: quitting now (exit 130)" in err
