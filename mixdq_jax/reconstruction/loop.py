"""BRECQ-style reconstruction: AdaRound rounding and LSQ step sizes, one unit at a time.

For each unit (`blocks.find_units`), in call order:

1. **weights** (``iters`` steps): Adam (``lr``) on the unit's AdaRound variables, minimising
   the unit's output error against the float model (squared error summed over channels,
   averaged over the rest: BRECQ's ``lp_loss`` at its default p = 2) plus ``reg_weight``
   times the rounding regulariser (off for the first ``warmup`` fraction, then ``beta``
   annealed 20 -> 2). ``layer_loss_weight`` > 0 adds EDA-DM's fine-grained block
   reconstruction (FBR): that weight times the sum of the same error at the outputs of the
   unit's layers (all but the last, whose output the block loss already covers), against the
   float model's layer outputs on the same samples (computed each step, so no per-layer
   targets are stored).
   Activations run in float in this phase, as in BRECQ's weight pass.
2. **activation steps** (``act_iters``, only for layers whose activations are quantized):
   the rounding hard, Adam (``act_lr``, cosine decay to 0) on the LSQ step sizes, minimising
   the same error with exponent ``p`` (``|d|^p`` summed over channels): BRECQ's and
   Q-Diffusion's activation pass (their ``--lr 4e-4 --p 2.4``; the weight pass keeps p = 2).

Inputs come from the model quantized so far (earlier units with their learned codes and
ranges, later ones nearest-rounded; BRECQ's ``asym`` inputs); each step draws
``batch_size`` calibration samples. A finished unit's hard rounding bits and learned ranges
are written through the run directory (`RunDir.write_reconstructed_unit`, atomic) and the
unit is folded into the params (`adaround.fold_codes`), so a killed run resumes at the
first missing unit and ends with the same codes. The result is an ordinary float params tree and
ordinary activation ranges: fake quantization, export and the integer path run them
unchanged. ``reference``: the float model the outputs are matched against when ``params`` is
not it (clipped kernels from a range search: `mixdq_jax.methods.range_search`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from mixdq_jax.deploy.packed import layer_kernel, with_layer_kernel
from mixdq_jax.quant.modes import FakeQuant
from mixdq_jax.quant.qconfig import FLOAT_BITS, QConfig
from mixdq_jax.reconstruction.adaround import (
    beta_schedule,
    fold_codes,
    init_rounding,
    learned_codes,
    nearest_codes,
    rounding_regularizer,
)
from mixdq_jax.reconstruction.blocks import Apply, Unit, UnitCall, capture, find_units, unit_inputs
from mixdq_jax.reconstruction.lsq import init_step, step_range
from mixdq_jax.reconstruction.mode import LearnedRounding, Rounding
from mixdq_jax.rundir import RunDir

Array = jax.Array


@dataclass(frozen=True, kw_only=True)
class ReconConfig:
    """Reconstruction settings; defaults are BRECQ's and Q-Diffusion's (``act_lr`` and ``p``:
    their activation pass, ``--lr 4e-4 --p 2.4``). ``blocks``: only these units (module
    names, e.g. the most sensitive blocks); empty: every unit."""

    iters: int = 20000
    act_iters: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    act_lr: float = 4e-4
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    learn_act_steps: bool = True
    seed: int = 0
    blocks: tuple[str, ...] = ()
    layer_loss_weight: float = 0.0
    p: float = 2.4

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.iters < 0 or self.act_iters < 0 or self.batch_size < 1:
            raise ValueError("ReconConfig: iters and act_iters must be >= 0, batch_size >= 1")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"ReconConfig: warmup {self.warmup} outside [0, 1)")
        if min(self.lr, self.act_lr) <= 0.0 or self.reg_weight < 0.0:
            raise ValueError("ReconConfig: lr and act_lr must be > 0, reg_weight >= 0")
        if self.layer_loss_weight < 0.0:
            raise ValueError("ReconConfig: layer_loss_weight must be >= 0")
        if not 1.0 <= self.p <= 10.0:
            raise ValueError(f"ReconConfig: p {self.p} outside [1, 10] (the Lp loss exponent)")

    def settings(self) -> dict[str, Any]:
        """The fields a resumed reconstruction must match; ``layer_loss_weight`` only when
        set and ``p`` only when not 2, so runs started before they existed still resume
        (those ran with p = 2: see `OLD_DEFAULTS_HINT`)."""
        out = {**asdict(self), "blocks": list(self.blocks)}
        if self.layer_loss_weight == 0.0:
            del out["layer_loss_weight"]
        if self.p == 2.0:
            del out["p"]
        return out


OLD_DEFAULTS_HINT = (
    "; a run started before Q-Diffusion's activation-pass settings became the defaults used "
    "act_lr 4e-5 and p 2: pass --recon-act-lr 4e-5 --recon-p 2 (ReconConfig(act_lr=4e-5, "
    "p=2.0)) to resume it"
)


@dataclass(frozen=True, kw_only=True)
class Reconstruction:
    """The result: params with the learned codes folded in, the configuration with the
    learned ranges, those ranges, and per unit the output MSE ``(nearest, learned)``."""

    params: Any
    qconfig: QConfig
    act_ranges: dict[str, np.ndarray]
    mse: dict[str, tuple[float, float]]




# ------------------------------------------------------------------------------ data
def _take(data: Any, idx: np.ndarray) -> Any:
    return jax.tree.map(lambda a: a[idx], data)


def _count(data: Any) -> int:
    sizes = {int(np.shape(a)[0]) for a in jax.tree.leaves(data)}
    if len(sizes) != 1:
        raise ValueError(f"calibration data: leaves disagree on the sample count {sorted(sizes)}")
    return sizes.pop()


def lp_loss(out: Array, target: Array, p: Array | float = 2.0) -> Array:
    """BRECQ's ``lp_loss``: ``|out - target|^p`` summed over channels (last axis), mean over
    the rest; ``p`` may be traced (p = 2 is the plain square, as before ``p`` existed)."""
    d = out.astype(jnp.float32) - target.astype(jnp.float32)
    err = jnp.where(p == 2.0, d * d, jnp.abs(d) ** p)
    return jnp.mean(jnp.sum(err, axis=-1))


@lru_cache(maxsize=4)
def _capturing(apply: Apply, names: tuple[str, ...]) -> Any:
    return jax.jit(lambda p, b: capture(apply, p, b, names, stop_early=True))


def float_targets(
    apply: Apply, params: Any, data: Any, names: Sequence[str], batch_size: int
) -> dict[str, np.ndarray]:
    """The float model's outputs of the modules ``names`` on every calibration sample."""
    run = _capturing(apply, tuple(names))
    n = _count(data)
    starts = range(0, n, batch_size)
    chunks = [run(params, _take(data, np.arange(s, min(s + batch_size, n)))) for s in starts]
    return {k: np.concatenate([np.asarray(c[k]) for c in chunks]) for k in names}


# ------------------------------------------------------------------------------ one unit
def _act_float(qconfig: QConfig) -> QConfig:
    """The configuration with every activation float (BRECQ's weight pass)."""
    layers = {
        n: replace(lq, a_bits=jnp.full_like(lq.a_bits, FLOAT_BITS))
        for n, lq in qconfig.layers.items()
    }
    return replace(qconfig, layers=layers)


@partial(jax.jit, static_argnames=("fmt", "split"))
def _nearest_v(kernel: Array, bits: Array, fmt: str, split: int | None) -> Array:
    """Rounding variables whose hard rounding is the fake quantizer's nearest rounding."""
    codes = nearest_codes(kernel, bits, fmt=fmt, split=split)
    down = learned_codes(kernel, -jnp.ones(kernel.shape, jnp.float32), bits, fmt=fmt, split=split)
    return jnp.where(codes > down, 1.0, -1.0)


def _pick(cond: Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


class _UnitRun:
    """One unit's whole reconstruction as a single compiled program: a ``lax.scan`` over the
    weight steps then the activation-step steps (the phase is data: which qconfig, which
    inputs, soft or hard rounding, which optimizer moves), then the evaluation. Each step runs
    the unit alone (`blocks.UnitCall`) on its inputs captured once from the model quantized so
    far: with float activations for the weight phase, quantized for the activation phase and
    the evaluation. Batch indices are drawn up front, so a rerun draws the same batches."""

    def __init__(self, unit: Unit, config: ReconConfig) -> None:
        self.config = config
        self.call: UnitCall | None = None  # set from the first `unit_inputs`, before tracing
        mode = LearnedRounding()
        inner = fbr_layers(unit) if config.layer_loss_weight > 0.0 else ()

        def loss(trainable, state, params, inputs, target, beta, reg_scale, float_params,
                 float_inputs, p=2.0):  # fmt: skip
            state = replace(state, v=trainable["v"], a_step=trainable["a_step"])
            out = self.call.run(params, inputs, mode=mode, qconfig=state, layers=inner)
            rec = lp_loss(out[unit.name], target, p)
            reg = sum((rounding_regularizer(v, beta) for v in trainable["v"].values()), 0.0)
            total = rec + reg_scale * reg
            if inner:  # EDA-DM's FBR: the float block's layer outputs on the float inputs
                ref = self.call.run(float_params, float_inputs, layers=inner)
                # p = 2 as EDA-DM's layer terms (its block_recon.py lp_loss(..., p=2))
                layers = [lp_loss(out[n], jax.lax.stop_gradient(ref[n])) for n in inner]
                total = total + config.layer_loss_weight * sum(layers[1:], layers[0])
            return total, rec

        self._loss = loss
        self._grad = jax.value_and_grad(loss, has_aux=True)
        self.run = jax.jit(self._program)

    def _program(self, trainable, nearest_v, zeros, qc_weights, qc, params, inputs_w, inputs_a,
                 targets, indices, eval_idx, float_params, float_inputs):  # fmt: skip
        c = self.config
        opt_w = optax.adam(c.lr)
        opt_a = optax.adam(optax.cosine_decay_schedule(c.act_lr, max(c.act_iters, 1), alpha=0.0))

        def take(arrays, idx):
            return [a[idx] for a in arrays]

        def step(carry, xs):
            tr, state_w, state_a = carry
            i, idx = xs
            weights = i < c.iters
            beta, on = beta_schedule(
                i, c.iters, warmup=c.warmup, start=c.beta_start, end=c.beta_end
            )
            state = Rounding(
                qconfig=_pick(weights, qc_weights, qc), a_zero=zeros,
                soft=weights.astype(jnp.float32),
            )  # fmt: skip
            reg_scale = jnp.where(on & weights, c.reg_weight, 0.0)
            inputs = _pick(weights, take(inputs_w, idx), take(inputs_a, idx))
            p = jnp.where(weights, 2.0, c.p)  # BRECQ's weight pass keeps its default p = 2
            (_, rec), g = self._grad(tr, state, params, inputs, targets[idx], beta, reg_scale,
                                     float_params, take(float_inputs, idx), p)  # fmt: skip
            up_w, new_w = opt_w.update(g["v"], state_w, tr["v"])
            up_a, new_a = opt_a.update(g["a_step"], state_a, tr["a_step"])
            tr = {
                "v": _pick(weights, optax.apply_updates(tr["v"], up_w), tr["v"]),
                "a_step": _pick(weights, tr["a_step"], optax.apply_updates(tr["a_step"], up_a)),
            }
            return (tr, _pick(weights, new_w, state_w), _pick(weights, state_a, new_a)), rec

        carry = (trainable, opt_w.init(trainable["v"]), opt_a.init(trainable["a_step"]))
        steps = jnp.arange(indices.shape[0])
        (learned, _, _), _ = jax.lax.scan(step, carry, (steps, indices))

        state = Rounding(qconfig=qc, a_zero=zeros, soft=jnp.float32(0.0))
        inputs, target = take(inputs_a, eval_idx), targets[eval_idx]
        float_in, zero = take(float_inputs, eval_idx), jnp.float32(0.0)
        nearest = {"v": nearest_v, "a_step": trainable["a_step"]}
        both = jax.tree.map(lambda a, b: jnp.stack([a, b]), nearest, learned)
        mse = jax.lax.map(  # one copy of the unit in the program, not two
            lambda tr: self._loss(tr, state, params, inputs, target, zero, zero, float_params,
                                  float_in)[1],
            both,
        )  # fmt: skip
        return learned, mse[0], mse[1]


def fbr_layers(unit: Unit) -> tuple[str, ...]:
    """The layers whose outputs EDA-DM's fine-grained loss matches: every layer of the unit
    but the last (as the public code; a single-layer unit has none)."""
    return tuple(n for n in unit.layers[:-1] if n != unit.name)


@lru_cache(maxsize=16)
def _unit_run(apply: Apply, unit: Unit, config: ReconConfig) -> _UnitRun:
    """Compiled programs of a unit, kept for a rerun (a resumed run or another method on
    the same model)."""
    return _UnitRun(unit, config)


def reconstruct(
    apply: Apply,
    params: Any,
    qconfig: QConfig,
    data: Any,
    *,
    config: ReconConfig = ReconConfig(),
    units: Sequence[Unit] | None = None,
    run: RunDir | None = None,
    key: str = "reconstruct",
    progress: bool = True,
    reference: Any = None,
) -> Reconstruction:
    """Learn the rounding (and activation steps) of every quantized unit of ``qconfig``.

    ``apply``: the model (`blocks.unet_apply`); ``params``: its float params, whose kernels
    are rounded; ``data``: a pytree of calibration samples with a leading sample axis
    (``apply``'s batch); ``units``: default every unit of the configuration's layers
    (`find_units`); ``run``: the run directory where finished units are written under
    ``key`` and found again (resume; the settings, units and bits must match the first
    run's); ``reference``: the float model whose unit outputs are matched (default
    ``params``; the unclipped params when ``params`` holds a range search's clipped kernels).
    """
    if qconfig.weight_format not in ("int", "int_sym"):
        raise ValueError(f"reconstruction needs integer weights, not {qconfig.weight_format!r}")
    w_bits, a_bits = qconfig.bits()
    units = tuple(find_units(list(qconfig.layers)) if units is None else units)
    if config.blocks:
        missing = sorted(set(config.blocks) - {u.name for u in units})
        if missing:
            raise ValueError(f"reconstruct: no unit named {missing[:10]} (blocks setting)")
        units = tuple(u for u in units if u.name in config.blocks)
    unknown = sorted({n for u in units for n in u.layers} - set(qconfig.layers))
    if unknown:
        raise ValueError(f"reconstruct: unit layer(s) not in the configuration: {unknown[:10]}")
    active = [
        (i, u)
        for i, u in enumerate(units)
        if any(w_bits[n] < FLOAT_BITS or a_bits[n] < FLOAT_BITS for n in u.layers)
    ]
    n = _count(data)
    if run is not None:
        _start(run, key, {
            **config.settings(), "samples": n, "weight_format": qconfig.weight_format,
            "units": [[u.name, list(u.layers)] for _, u in active],
            "w_bits": w_bits, "a_bits": a_bits,
        })  # fmt: skip
    base = params  # the kernels the codes round (and fold into)
    reference = params if reference is None else reference
    mse: dict[str, tuple[float, float]] = {}
    ranges: dict[str, np.ndarray] = {}
    bar = tqdm(active, desc="reconstruction", unit="block", file=sys.stderr, disable=not progress)
    for i, unit in bar:
        stored = None if run is None else run.reconstructed_unit(key, i)
        if stored is None:
            # the float outputs of this unit only: all units' at once would not fit at SDXL
            # size (tens of GB for 32 samples)
            target = float_targets(apply, reference, data, [unit.name], config.batch_size)
            stored = _learn_unit(apply, base, reference, params, qconfig, data,
                                 target[unit.name], unit, i, n, config, w_bits,
                                 a_bits)  # fmt: skip
            if run is not None:
                run.write_reconstructed_unit(key, i, stored)
        params, qconfig = _apply_unit(base, params, qconfig, unit, stored, w_bits)
        for name in unit.layers:
            if f"range/{name}" in stored:
                ranges[name] = np.asarray(stored[f"range/{name}"])
        mse[unit.name] = (float(stored["mse_nearest"]), float(stored["mse_learned"]))
    return Reconstruction(params=params, qconfig=qconfig, act_ranges=ranges, mse=mse)


def _start(run: RunDir, key: str, settings: dict[str, Any]) -> None:
    """Record the settings, or check a resumed run's; a run of the older defaults is told
    how to resume."""
    try:
        run.start_reconstruction(key, settings)
    except ValueError as err:
        path = run.reconstruction_dir(key) / "settings.json"
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            raise err from None
        if "p" not in old and old.get("act_lr") == 4e-5 and settings.get("act_lr") != 4e-5:
            raise ValueError(f"{err}{OLD_DEFAULTS_HINT}") from None
        raise


def _learn_unit(
    apply: Apply,
    base: Any,
    reference: Any,
    params: Any,
    qconfig: QConfig,
    data: Any,
    target: np.ndarray,
    unit: Unit,
    index: int,
    n: int,
    config: ReconConfig,
    w_bits: Mapping[str, int],
    a_bits: Mapping[str, int],
) -> dict[str, np.ndarray]:
    fmt = qconfig.weight_format
    v, v_nearest, steps_init, zeros = {}, {}, {}, {}
    for name in unit.layers:
        lq = qconfig.layers[name]
        if w_bits[name] < FLOAT_BITS:
            kernel = layer_kernel(base, name)
            v[name] = init_rounding(kernel, w_bits[name], fmt=fmt, split=lq.split)
            v_nearest[name] = _nearest_v(kernel, w_bits[name], fmt=fmt, split=lq.split)
        if config.learn_act_steps and a_bits[name] < FLOAT_BITS:
            steps_init[name], zeros[name] = init_step(lq.a_range, a_bits[name])
    rng = np.random.default_rng([config.seed, index])
    size = min(config.batch_size, n)
    if not v:  # nothing to round: only the activation phase runs
        config = replace(config, iters=0)
    if not steps_init:
        config = replace(config, act_iters=0)
    rows = [
        np.sort(rng.choice(n, size=size, replace=False))
        for _ in range(config.iters + config.act_iters)
    ]
    indices = jnp.asarray(np.stack(rows) if rows else np.zeros((0, size), np.int64))
    trainable = {"v": v, "a_step": dict(steps_init)}
    # the unit's inputs, once: the model quantized so far (earlier units learned, later
    # ones nearest), activations float for the weight phase, as configured for the rest
    qc_weights = _act_float(qconfig)
    fake = FakeQuant()
    call, inputs_w = unit_inputs(apply, params, data, unit.name, config.batch_size,
                                 mode=fake, qconfig=qc_weights)  # fmt: skip
    inputs_a = inputs_w
    if any(b < FLOAT_BITS for b in a_bits.values()):
        _, inputs_a = unit_inputs(apply, params, data, unit.name, config.batch_size, mode=fake,
                                  qconfig=qconfig)  # fmt: skip
    float_inputs: list[np.ndarray] = []
    if config.layer_loss_weight > 0.0 and fbr_layers(unit):
        _, float_inputs = unit_inputs(apply, reference, data, unit.name, config.batch_size)
    if target.shape[0] != n:
        raise ValueError(f"unit {unit.name!r}: {target.shape[0]} outputs for {n} samples (a "
                         "module called more than once cannot be reconstructed alone)")  # fmt: skip
    program = _unit_run(apply, unit, config)
    program.call = call
    trainable, mse_nearest, mse_learned = program.run(
        trainable, v_nearest, zeros, qc_weights, qconfig, params, inputs_w, inputs_a,
        jnp.asarray(target), indices, jnp.arange(size), reference, float_inputs,
    )  # fmt: skip
    out = {"mse_nearest": np.float64(mse_nearest), "mse_learned": np.float64(mse_learned)}
    for name, vv in trainable["v"].items():
        out[f"up/{name}"] = np.asarray(vv >= 0, np.uint8)
    for name, s in trainable["a_step"].items():
        out[f"range/{name}"] = np.asarray(step_range(s, zeros[name], a_bits[name]), np.float32)
    return out


def _apply_unit(
    base: Any,
    params: Any,
    qconfig: QConfig,
    unit: Unit,
    stored: Mapping[str, np.ndarray],
    w_bits: Mapping[str, int],
) -> tuple[Any, QConfig]:
    """Fold a finished unit's codes into the params and its ranges into the configuration."""
    layers = dict(qconfig.layers)
    for name in unit.layers:
        lq = layers[name]
        if f"up/{name}" in stored:
            kernel = layer_kernel(base, name)
            v = jnp.where(jnp.asarray(stored[f"up/{name}"]) > 0, 1.0, -1.0)
            if v.shape != kernel.shape:
                raise ValueError(
                    f"stored rounding of {name!r} has shape {v.shape}, the kernel {kernel.shape}"
                    ": the run was reconstructed for another model"
                )
            folded = fold_codes(kernel, v, w_bits[name], fmt=qconfig.weight_format,
                                split=lq.split, name=name)  # fmt: skip
            params = with_layer_kernel(params, name, folded)
        if f"range/{name}" in stored:
            layers[name] = replace(lq, a_range=jnp.asarray(stored[f"range/{name}"], jnp.float32))
    return params, replace(qconfig, layers=layers)
