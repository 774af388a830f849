"""Reference data vendored in ``tests/data`` (each folder's PROVENANCE.md says where it is from).

The tests that read these files fail, never skip, when one is missing: a silent skip would hide a
broken clone and let the official-format and full-size checks stop running unnoticed.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
OFFICIAL = DATA / "mixdq_official"  # the official MixDQ SDXL-turbo sensitivities and configs
SDXL_TURBO = DATA / "sdxl_turbo"  # SDXL-turbo's component configs (no weights)


def require(path: Path) -> Path:
    """``path`` if it exists; otherwise fail the test, naming the missing file."""
    if not path.exists():
        shown = path.relative_to(DATA.parent.parent) if path.is_relative_to(DATA) else path
        pytest.fail(
            f"reference data {shown} is missing: the repository's tests/data is incomplete "
            "(restore it with `git checkout -- tests/data`)",
            pytrace=False,
        )
    return path


def official(*parts: str) -> Path:
    """A file or folder of the official MixDQ data, e.g. ``official("sensitivity")``."""
    return require(OFFICIAL.joinpath(*parts))


def plain_yaml(path: Path) -> dict:
    """An official YAML file read by plain PyYAML, the ``model.`` prefix dropped: an
    independent reader for the reference numbers (not `mixdq_jax.official_format`)."""
    import yaml  # noqa: PLC0415

    return {k.removeprefix("model."): v for k, v in yaml.safe_load(path.read_text()).items()}


def sdxl_turbo(*parts: str) -> Path:
    """A file of the SDXL-turbo component configs, e.g. ``sdxl_turbo("unet_config.json")``."""
    return require(SDXL_TURBO.joinpath(*parts))


def sdxl_turbo_tokenizers(dest: Path) -> Path:
    """SDXL-turbo's ``tokenizer/`` and ``tokenizer_2/`` assembled under ``dest`` (the shared
    vocab and merges are stored once, gzipped); returns ``dest``."""
    vocab = require(SDXL_TURBO / "tokenizer" / "vocab.json.gz").read_bytes()
    merges = require(SDXL_TURBO / "tokenizer" / "merges.txt.gz").read_bytes()
    for name in ("tokenizer", "tokenizer_2"):
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_bytes(gzip.decompress(vocab))
        (folder / "merges.txt").write_bytes(gzip.decompress(merges))
        for config in ("tokenizer_config.json", "special_tokens_map.json"):
            (folder / config).write_bytes(require(SDXL_TURBO / name / config).read_bytes())
    return dest
