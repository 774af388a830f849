"""The built-in methods: the rows of the paper's tables and its baselines.

``PAPER_ROWS``: Tables 1 and 3 (the ablation adds one technique per row) and the FP8 row
of Table 2. ``RECONSTRUCTION_ROWS``: the reconstruction baselines (Table 1's Q-Diffusion,
Table 2's PTQD and EDA-DM) and MixDQ's bits with learned rounding; `mixdq quantize
--method` offers them, and a default study leaves them out (they take hours at full
settings; ``mixdq demo --methods`` opts in). Q-Diffusion, PTQD and EDA-DM quantize
uniformly without BOS handling, as naive PTQ; PTQD is Q-Diffusion's reconstruction plus
its noise correction (its experiments start from BRECQ/AdaRound-calibrated models); EDA-DM
is Q-Diffusion's reconstruction with TDAC and layer losses at weight 0.5 (the public code's
Stable Diffusion setting).
"""

from __future__ import annotations

from mixdq_jax.methods.format import FP8
from mixdq_jax.methods.method import Method
from mixdq_jax.methods.mixdq import MixDQGroups
from mixdq_jax.methods.ptqd import PTQDCorrection
from mixdq_jax.methods.reconstruction import BlockReconstruction
from mixdq_jax.methods.registry import get_method, register_method
from mixdq_jax.methods.sqnr import SqnrProgram
from mixdq_jax.methods.uniform import Uniform

_UNIFORM, _SQNR, _MIXDQ = Uniform(), SqnrProgram(), MixDQGroups()

PAPER_ROWS = ("naive", "naive+bos", "sqnr-mp", "fp8", "mixdq-no-bos", "mixdq")
RECONSTRUCTION_ROWS = ("qdiffusion", "ptqd", "mixdq+adaround", "edadm")

for _method in (
    Method(name="naive", title="naive PTQ", allocator=_UNIFORM, bos_aware=False),
    Method(name="naive+bos", title="+BOS", allocator=_UNIFORM),
    Method(name="sqnr-mp", title="+MP (SQNR)", allocator=_SQNR),
    Method(name="fp8", title="FP8 e4m3", allocator=_UNIFORM, format=FP8),
    Method(name="mixdq-no-bos", title="MixDQ w/o BOS", allocator=_MIXDQ, bos_aware=False),
    Method(name="mixdq", title="MixDQ", allocator=_MIXDQ),
    Method(name="qdiffusion", title="Q-Diffusion", allocator=_UNIFORM, bos_aware=False,
           refiners=(BlockReconstruction(),)),
    Method(name="ptqd", title="PTQD", allocator=_UNIFORM, bos_aware=False,
           refiners=(BlockReconstruction(), PTQDCorrection())),
    Method(name="mixdq+adaround", title="MixDQ + AdaRound", allocator=_MIXDQ,
           refiners=(BlockReconstruction(),)),
    Method(name="edadm", title="EDA-DM", allocator=_UNIFORM, bos_aware=False,
           refiners=(BlockReconstruction(calib_select=True, layer_loss_weight=0.5),)),
):  # fmt: skip
    register_method(_method)

METHODS: dict[str, Method] = {name: get_method(name) for name in PAPER_ROWS}
RECONSTRUCTION_METHODS: dict[str, Method] = {name: get_method(name) for name in RECONSTRUCTION_ROWS}
