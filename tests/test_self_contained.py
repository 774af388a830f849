"""The repository stands on its own: no file names a folder beside it or an absolute path of
the machine it was written on (a user's clone has neither)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# built from parts so this file does not match itself
OUTSIDE = ("../" + "shared", "/" + "work/", "/" + "home/", "/" + "Users/")
TEXT = (".py", ".md", ".txt", ".toml", ".yaml", ".yml", ".json", ".sh", ".cfg", "Makefile")


def test_no_path_outside_the_repository():
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    hits = []
    for name in files:
        path = ROOT / name
        if not name.endswith(TEXT) or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(errors="replace")
        hits += [f"{name}: {needle}" for needle in OUTSIDE if needle in text]
    assert not hits, hits
