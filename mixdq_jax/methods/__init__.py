"""Quantization methods as plug-ins: a method is an allocator, refiners and a format.

A `Method` is one registry entry (`register_method`): an :class:`Allocator` chooses bits
(candidates the recipe picks among by image error), zero or more :class:`Refiner` steps
improve the quantized UNet (learned rounding, PTQD), a :class:`Format` says how values are
stored, and ``bos_aware`` turns on BOS-aware text-embedding quantization. A new baseline is
one module with its allocator or refiner and one `register_method` call; from outside the
package, ``mixdq quantize --plugin my_method.py --method NAME`` (`load_plugin`) or an import
in Python. See ``examples/custom_method.py``.
"""

from mixdq_jax.allocation.driver import AllocationOptions
from mixdq_jax.deploy.packed import layer_kernel, with_layer_kernel
from mixdq_jax.methods.allocator import Allocator, act_budget
from mixdq_jax.methods.builtin import (
    METHODS,
    PAPER_ROWS,
    RECONSTRUCTION_METHODS,
    RECONSTRUCTION_ROWS,
)
from mixdq_jax.methods.format import FP8, INT, LOWRANK, Format, LowRankSettings
from mixdq_jax.methods.inputs import (
    AllocationContext,
    Bits,
    Layers,
    Sensitivities,
    bits_summary,
    fingerprint,
)
from mixdq_jax.methods.method import Method
from mixdq_jax.methods.mixdq import MixDQGroups
from mixdq_jax.methods.ptqd import PTQDCorrection
from mixdq_jax.methods.range_search import RangeSearch
from mixdq_jax.methods.reconstruction import BlockReconstruction
from mixdq_jax.methods.refiner import RefineContext, Refiner
from mixdq_jax.methods.registry import get_method, load_plugin, method_names, register_method
from mixdq_jax.methods.sqnr import SqnrProgram
from mixdq_jax.methods.target import Target
from mixdq_jax.methods.uniform import Uniform
from mixdq_jax.quant.quantized import QuantizedUNet

__all__ = [
    "FP8",
    "INT",
    "LOWRANK",
    "METHODS",
    "PAPER_ROWS",
    "RECONSTRUCTION_METHODS",
    "RECONSTRUCTION_ROWS",
    "AllocationContext",
    "AllocationOptions",
    "Allocator",
    "Bits",
    "BlockReconstruction",
    "Format",
    "Layers",
    "LowRankSettings",
    "Method",
    "MixDQGroups",
    "PTQDCorrection",
    "QuantizedUNet",
    "RangeSearch",
    "RefineContext",
    "Refiner",
    "Sensitivities",
    "SqnrProgram",
    "Target",
    "Uniform",
    "act_budget",
    "bits_summary",
    "fingerprint",
    "get_method",
    "layer_kernel",
    "load_plugin",
    "method_names",
    "register_method",
    "with_layer_kernel",
]
