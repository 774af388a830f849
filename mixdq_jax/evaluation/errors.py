"""The one error for an evaluation network whose weights are not on this machine."""

from __future__ import annotations

from pathlib import Path


class MissingWeightsError(FileNotFoundError):
    """A metric needs weights the user has not given (or a path that does not hold them)."""

    def __init__(self, metric: str, path: Path | str | None, *, expected: str, source: str):
        where = "no path given" if path is None else f"{path} does not hold them"
        super().__init__(
            f"{metric}: needs {expected} ({where}). They come from {source}; nothing is "
            "downloaded here, so fetch them once and pass the path."
        )
        self.metric = metric
        self.path = path
