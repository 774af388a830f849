"""Full-size UNet parity and CPU latency: diffusers (PyTorch) vs mixdq-jax, same random weights.

One float32 forward of the UNet in `--unet-config` (default: SDXL-turbo) at a 64x64 latent with
a 77-token context (SDXL: text_embeds 1280, time_ids 6), in both frameworks, then prints JSON:
max abs error, relative error (max abs / max abs of the reference) and both wall times.

Memory: each fp32 SDXL UNet is ~10.3 GB, so the two never coexist. A child process builds the
diffusers model, runs it, writes its state dict (safetensors, written without a second copy) and
output to a temp folder and exits; this process, which never imports torch, then converts the
tensors one at a time into JAX arrays.

    python benchmarks/unet_fullsize_parity.py                       # full size: ~25 GB peak disk
    python benchmarks/unet_fullsize_parity.py --unet-config tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "tests" / "data" / "sdxl_turbo" / "unet_config.json"


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unet-config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--latent", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    ap.add_argument("--timestep", type=float, default=999.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="temp folder parent")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    ap.add_argument("--phase", choices=("all", "torch"), default="all", help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def _config_dict(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _make_inputs(cfg: dict, latent: tuple[int, int], timestep: float, seed: int) -> dict:
    """Seeded inputs shaped for the config (SDXL conventions for the added conditioning)."""
    rng = np.random.default_rng(seed)
    h, w = latent
    ctx = cfg.get("cross_attention_dim", 1280)
    ctx = ctx[0] if isinstance(ctx, list) else ctx
    inputs = {
        "sample": rng.standard_normal((1, cfg.get("in_channels", 4), h, w)).astype(np.float32),
        "timestep": np.array([timestep], np.float32),
        "encoder_hidden_states": rng.standard_normal((1, 77, ctx)).astype(np.float32),
    }
    if cfg.get("addition_embed_type") == "text_time":
        text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        inputs["text_embeds"] = rng.standard_normal((1, text_dim)).astype(np.float32)
        inputs["time_ids"] = np.array([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]], np.float32)
    if cfg.get("time_cond_proj_dim"):
        inputs["timestep_cond"] = rng.standard_normal((1, cfg["time_cond_proj_dim"]))
        inputs["timestep_cond"] = inputs["timestep_cond"].astype(np.float32)
    return inputs


def _torch_phase(args: argparse.Namespace) -> None:
    """Child process: random diffusers UNet -> state dict file + reference output + timing."""
    import diffusers
    import torch
    from safetensors.torch import save_file

    work = args.dir
    torch.manual_seed(args.seed)
    model = diffusers.UNet2DConditionModel(**_config_dict(args.unet_config)).eval()
    with np.load(work / "inputs.npz") as f:
        inp = {k: torch.from_numpy(f[k]) for k in f.files}
    kwargs = {}
    if "text_embeds" in inp:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": inp["text_embeds"],
            "time_ids": inp["time_ids"],
        }
    if "timestep_cond" in inp:
        kwargs["timestep_cond"] = inp["timestep_cond"]
    with torch.no_grad():
        start = time.perf_counter()
        out = model(inp["sample"], inp["timestep"], inp["encoder_hidden_states"], **kwargs).sample
        seconds = time.perf_counter() - start
    np.save(work / "torch_out.npy", out.numpy())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, work / "unet.safetensors")
    (work / "torch.json").write_text(
        json.dumps({"torch_forward_s": seconds, "torch_threads": torch.get_num_threads()})
    )


class _LazyState(Mapping):
    """A safetensors file as a read-on-access {name: numpy array} mapping."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="numpy")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _jax_phase(args: argparse.Namespace, work: Path) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, param_shapes
    from weights_convert import torch_to_flax

    model = UNet2DConditionModel(UNetConfig.from_json(args.unet_config))
    state = _LazyState(work / "unet.safetensors")
    flat = traverse_util.flatten_dict(torch_to_flax(state, param_shapes(model), what="UNet"))
    params = {}
    for key in list(flat):  # one host copy at a time: numpy leaf -> JAX array, then drop it
        params[key] = jnp.asarray(flat.pop(key))
    params = traverse_util.unflatten_dict(params)
    num_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))

    with np.load(work / "inputs.npz") as f:
        inp = {k: f[k] for k in f.files}
    kwargs = {}
    if "text_embeds" in inp:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": inp["text_embeds"],
            "time_ids": inp["time_ids"],
        }
    if "timestep_cond" in inp:
        kwargs["timestep_cond"] = inp["timestep_cond"]
    call_args = ({"params": params}, inp["sample"], inp["timestep"], inp["encoder_hidden_states"])
    start = time.perf_counter()
    compiled = jax.jit(model.apply).lower(*call_args, **kwargs).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = np.asarray(jax.block_until_ready(compiled(*call_args, **kwargs)))
    forward_s = time.perf_counter() - start

    ref = np.load(work / "torch_out.npy")
    err = float(np.max(np.abs(out.astype(np.float64) - ref)))
    ref_max = float(np.max(np.abs(ref)))
    return {
        "num_params": num_params,
        "max_abs_err": err,
        "rel_err": err / ref_max,
        "ref_max_abs": ref_max,
        "jax_compile_s": compile_s,
        "jax_forward_s": forward_s,
    }


def main() -> None:
    args = _parse()
    if args.phase == "torch":
        _torch_phase(args)
        return
    work = Path(tempfile.mkdtemp(prefix="unet_parity_", dir=args.workdir))
    try:
        cfg = _config_dict(args.unet_config)
        np.savez(work / "inputs.npz", **_make_inputs(cfg, args.latent, args.timestep, args.seed))
        cmd = [sys.executable, __file__, "--phase", "torch", "--dir", str(work)]
        cmd += ["--unet-config", str(args.unet_config), "--seed", str(args.seed)]
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run(cmd, check=True, env=env)
        torch_meta = json.loads((work / "torch.json").read_text())
        sys.path.insert(0, str(REPO))
        result = {
            "unet_config": str(args.unet_config),
            "latent": list(args.latent),
            "timestep": args.timestep,
            "dtype": "float32",
            **_jax_phase(args, work),
            **torch_meta,
            "cpu_count": os.cpu_count(),
        }
        print(json.dumps(result, indent=2))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
