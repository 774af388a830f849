"""``mixdq generate --out``: a rerun of the same run resumes byte for byte; another run's
folder, or the user's own files, are refused (naming the folder) instead of overwritten."""

from __future__ import annotations

import json

from tests.cli.conftest import failed, fingerprint, mixdq


def test_resume_is_exact_and_another_run_is_refused(tmp_path):
    out = tmp_path / "out"
    first = mixdq("generate", "--prompt", "a red circle", "--prompt", "a blue square", "--out", out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "mixdq generate: compiling the UNet sampling loop (first call; " in first.stderr
    done = fingerprint(out)
    assert set(done) == {"0000.png", "0001.png", "prompts.json"}
    # an interrupted run: the second image is missing; the rerun makes exactly it again
    (out / "0001.png").unlink()
    again = mixdq("generate", "--prompt", "a red circle", "--prompt", "a blue square", "--out", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert fingerprint(out) == done
    assert "compiling the UNet sampling loop (first call; about " in again.stderr  # recorded
    # other prompts, then other settings: refused, nothing changed
    other = mixdq("generate", "--prompt", "a green circle", "--out", out)
    failed(other, 2, f"--out {out}", "other prompts", "--overwrite")
    steps = ["--steps", "2", "--out", out]
    other = mixdq("generate", "--prompt", "a red circle", "--prompt", "a blue square", *steps)
    failed(other, 2, f"--out {out}", "other settings", "steps", "--overwrite")
    assert fingerprint(out) == done
    # --overwrite replaces the earlier run and leaves no unindexed image behind
    replaced = mixdq("generate", "--prompt", "a green circle", "--out", out, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    index = json.loads((out / "prompts.json").read_text())
    assert [r["prompt"] for r in index["images"]] == ["a green circle"]
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "prompts.json"]


def test_the_users_own_files_are_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "0000.png").write_bytes(b"\x89PNG the user's picture")
    (out / "notes.txt").write_text("the user's")
    before = fingerprint(out)
    failed(mixdq("generate", "--prompt", "a", "--out", out), 2, f"--out {out}", "0000.png")
    assert fingerprint(out) == before
    (out / "0000.png").unlink()
    (out / "prompts.json").write_text("my prompts, not JSON")
    failed(mixdq("generate", "--prompt", "a", "--out", out), 2, str(out / "prompts.json"))
    assert (out / "prompts.json").read_text() == "my prompts, not JSON"
