"""MixDQ on your own Flax model (Linen or NNX), given as a pure ``apply(params, *inputs)``.

::

    from mixdq_jax import any_model

    apply = lambda params, *x: module.apply({"params": params}, *x)  # Linen
    apply, params = any_model.nnx_apply(nnx_model)                     # or NNX

    q = any_model.quantize(apply, params, batches, budget=any_model.Budget(weight_bits=4))
    out = jax.jit(q.apply)(params, q.qconfig, *inputs)   # one compile for every qconfig

The steps are public too: `model_layers` (the layer registry), `calibrate` (input ranges),
`sweep` (each layer alone at 2/4/8 bits, one vmapped program), `allocate` (MixDQ's integer
program) and `fake_quantized` (the quantized function).
"""

from mixdq_jax.any_model.allocation import Budget, allocate
from mixdq_jax.any_model.calibration import calibrate
from mixdq_jax.any_model.functions import ApplyFn, QuantizedApply, fake_quantized, nnx_apply
from mixdq_jax.any_model.registry import RecordLayers, float_qconfig, model_layers
from mixdq_jax.any_model.sensitivity import Metric, Sensitivity, SweepConfig, sqnr, sweep
from mixdq_jax.any_model.workflow import Quantized, quantize

__all__ = [
    "ApplyFn",
    "Budget",
    "Metric",
    "Quantized",
    "QuantizedApply",
    "RecordLayers",
    "Sensitivity",
    "SweepConfig",
    "allocate",
    "calibrate",
    "fake_quantized",
    "float_qconfig",
    "model_layers",
    "nnx_apply",
    "quantize",
    "sqnr",
    "sweep",
]
