"""A method: an allocator, zero or more refiners, a format, and BOS handling.

The rows of the paper's tables and every baseline are `Method` values in the registry
(`mixdq_jax.methods.registry`); the recipe reads nothing else of a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixdq_jax.methods.allocator import Allocator
from mixdq_jax.methods.format import INT, Format
from mixdq_jax.methods.refiner import Refiner
from mixdq_jax.methods.target import Target


@dataclass(frozen=True, kw_only=True)
class Method:
    """``allocator`` chooses the bits, ``refiners`` improve the quantized UNet in order,
    ``format`` is the number format, ``bos_aware`` is the paper's BOS-aware quantization of
    the text embedding (sec. 3.1). ``title``: the row's name in tables."""

    name: str
    title: str
    allocator: Allocator
    refiners: tuple[Refiner, ...] = ()
    format: Format = INT
    bos_aware: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "refiners", tuple(self.refiners))
        if not self.name or any(c.isspace() or c in "/\\" for c in self.name):
            raise ValueError(f"method name {self.name!r}: no spaces or slashes (it names files)")
        if not isinstance(self.allocator, Allocator):
            raise ValueError(f"method {self.name!r}: allocator must be an Allocator instance")
        for refiner in self.refiners:
            if not isinstance(refiner, Refiner):
                raise ValueError(f"method {self.name!r}: {refiner!r} is not a Refiner instance")
        self.format.check(self)

    def supports(self, target: Target) -> str | None:
        """Why this method has no configuration for ``target`` (``None``: it has one)."""
        why = self.allocator.supports(target) or self.format.supports(target)
        return None if why is None else f"{self.name} {why}"

    @property
    def refines(self) -> bool:
        return bool(self.refiners)

    def settings(self) -> dict[str, Any]:
        """What a resumed recipe must match (the keys runs before the registry wrote, so
        they still resume)."""
        out: dict[str, Any] = {"name": self.name, "title": self.title}
        out.update(self.allocator.settings())
        out["bos_aware"] = self.bos_aware
        out.update(self.format.settings())
        for refiner in self.refiners:
            out.update(refiner.settings())
        return out
