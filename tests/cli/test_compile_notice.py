"""The "compiling ..." line: said once before a big program's first call, with the time it
took last time (kept in a small record), only while the command listens."""

from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp

from mixdq_jax.cli.compile_notice import CompileNotice
from mixdq_jax.compile_events import first_call, signature


def _program():
    return jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0))


def test_says_what_compiles_once_then_the_recorded_time(tmp_path, capsys):
    record, x = tmp_path / "times.json", jnp.ones((32, 32))
    stream = io.StringIO()
    fn = _program()
    with CompileNotice("mixdq test", record, stream):
        for _ in range(2):  # the second call is compiled: silent
            with first_call("the test program", fn, x):
                fn(x).block_until_ready()
    assert stream.getvalue() == (
        "mixdq test: compiling the test program (first call; time not known yet: measured for "
        "next time)\n"
    )
    (key, seconds), *more = json.loads(record.read_text()).items()
    assert not more and key == f"the test program|{signature((x,))}"
    assert 0 < seconds < 60
    record.write_text(json.dumps({key: 42.0}))  # a slow compile last time
    stream = io.StringIO()
    fresh = _program()  # a new process would compile again
    with CompileNotice("mixdq test", record, stream):
        with first_call("the test program", fresh, x):
            fresh(x)
        with first_call("the test program", _program(), x[:8]):  # other shapes: unknown
            pass
    lines = stream.getvalue().splitlines()
    assert (
        lines[0] == "mixdq test: compiling the test program (first call; about 42 s last time here)"
    )
    assert lines[1].endswith("(first call; time not known yet: measured for next time)")
    # a library call outside a command is quiet
    with first_call("the test program", _program(), x):
        pass
    assert capsys.readouterr() == ("", "")


def test_an_unwritable_record_is_ignored(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    stream = io.StringIO()
    fn, x = _program(), jnp.ones((4, 4))
    with CompileNotice("mixdq test", blocked / "times.json", stream):
        with first_call("the test program", fn, x):
            fn(x)
    assert "compiling the test program" in stream.getvalue()
