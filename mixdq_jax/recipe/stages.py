"""The recipe's stages as one table, walked by `mixdq quantize` and the study alike.

Each `Stage` names itself, says when a row does not need it (uniform bits need no sweep, a
method without refiners no reconstruction, a run without ``--out`` no export) and runs
through `Recipe`, whose methods resume from the run directory. ``stop_after`` ends a walk
after any stage, so the sweep can run on one machine and the rest on another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdq_jax.methods import Method, Target
from mixdq_jax.recipe.run import (
    Recipe,
    RecipeConfig,
    check_request,
    recipe_key,
)
from mixdq_jax.recipe.run import log as recipe_log
from mixdq_jax.rundir import RunDir

if TYPE_CHECKING:
    from mixdq_jax.evaluation.run import ReportEval
    from mixdq_jax.pipeline import Pipeline


@dataclass(frozen=True, kw_only=True)
class Row:
    """One (target, method) of a run, and where its export goes (``None``: no export)."""

    target: Target
    method: Method
    out: Path | None = None
    overwrite: bool = False
    evaluation: ReportEval | None = None

    @property
    def key(self) -> str:
        return recipe_key(self.target, self.method)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """``skip(row)``: why ``row`` does not need this stage (``None``: it does);
    ``run(recipe, row)``: run or resume it, returning what later callers use."""

    name: str
    skip: Callable[[Row], str | None]
    run: Callable[[Recipe, Row], Any]


def _never(row: Row) -> None:
    return None


def _sweeps(row: Row) -> str | None:
    allocator = row.method.allocator
    return None if allocator.uses_scores else f"the {allocator.name} allocator reads no sweeps"


def _lowrank(row: Row) -> str | None:
    fmt = row.method.format
    return None if fmt.lowrank is not None else f"the {fmt.name} format has no low-rank branch"


def _refiners(row: Row) -> str | None:
    return None if row.method.refiners else f"{row.method.name} has no refiners"


def _export(row: Row) -> str | None:
    return None if row.out is not None else "no output folder"


def _reconstruct(recipe: Recipe, row: Row) -> Any:
    allocation = recipe.allocation(row.target, row.method)
    recipe.learned(allocation)
    return allocation


STAGES: tuple[Stage, ...] = (
    Stage(name="calibrate", skip=_never, run=lambda r, row: r.calibrate()),
    Stage(name="lowrank", skip=_lowrank,
          run=lambda r, row: r.lowrank(row.method.format, bos_aware=row.method.bos_aware)),
    Stage(name="sensitivity", skip=_sweeps,
          run=lambda r, row: r.sensitivities(bos_aware=row.method.bos_aware,
                                             fmt=row.method.format)),
    Stage(name="weights", skip=_never, run=lambda r, row: r.weights(row.target, row.method)),
    Stage(name="acts", skip=_never, run=lambda r, row: r.allocation(row.target, row.method)),
    Stage(name="reconstruct", skip=_refiners, run=_reconstruct),
    Stage(name="export", skip=_export,
          run=lambda r, row: r.export(r.allocation(row.target, row.method), row.out,
                                      overwrite=row.overwrite)),
    Stage(name="report", skip=_never,
          run=lambda r, row: r.report(r.allocation(row.target, row.method), row.out,
                                      row.evaluation)),
)  # fmt: skip
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)


def walk(
    recipe: Recipe,
    row: Row,
    *,
    stop_after: str = "report",
    log: Callable[[str], None] | None = None,
) -> Any:
    """Run (or resume) ``row``'s stages in order up to ``stop_after``; returns the last
    stage's result (the allocation after ``acts``/``reconstruct``, the report after
    ``report``)."""
    if stop_after not in STAGE_NAMES:
        raise ValueError(f"stop_after {stop_after!r}: choose one of {', '.join(STAGE_NAMES)}")
    result = None
    for stage in STAGES:
        why = stage.skip(row)
        if why is None:
            if log is not None:
                log(f"stage {stage.name}" + (f" -> {row.out}" if stage.name == "export" else ""))
            result = stage.run(recipe, row)
        elif log is not None:
            log(f"stage {stage.name}: not needed ({why})")
        if stage.name == stop_after:
            break
    return result


def quantize(
    pipe: Pipeline,
    run: RunDir | str | Path,
    config: RecipeConfig,
    *,
    target: Target,
    method: Method,
    out: str | Path | None = None,
    stop_after: str = "report",
    overwrite: bool = False,
    evaluation: ReportEval | None = None,
) -> dict[str, Any] | None:
    """Run (or resume) the recipe for one (target, method) up to ``stop_after``; returns the
    report, or ``None`` when stopped earlier. ``evaluation``: the paper's metrics in the
    report (`Recipe.evaluate`). Without ``out`` the export stage is skipped; ``out`` is
    checked before any work (`mixdq_jax.deploy.check_export_folder`: new, empty or an
    earlier export, unless ``overwrite``)."""
    if stop_after not in STAGE_NAMES:
        raise ValueError(f"stop_after {stop_after!r}: choose one of {', '.join(STAGE_NAMES)}")
    check_request(target, method, out)
    if out is not None:
        from mixdq_jax.deploy.checkpoint import check_export_folder  # noqa: PLC0415

        check_export_folder(pipe.source, out, overwrite=overwrite)
    row = Row(target=target, method=method, out=None if out is None else Path(out),
              overwrite=overwrite, evaluation=evaluation)  # fmt: skip
    report = walk(Recipe(pipe, run, config), row, stop_after=stop_after, log=recipe_log)
    return report if stop_after == "report" else None
