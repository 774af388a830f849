"""The built-in methods: the rows of the paper's tables and its baselines.

``PAPER_ROWS``: Tables 1 and 3 (the ablation adds one technique per row) and Table 2's
rows without BOS handling, as the paper ran them (its FP8 row is Fig. 9's alternative to
BOS, and its "MP-only" is MixDQ's mixed precision alone: ``mixdq-no-bos``), with FP8 + BOS
as a separate, labelled row. ``RECONSTRUCTION_ROWS``: the reconstruction baselines
(Table 1's Q-Diffusion, Table 2's PTQD and EDA-DM) and MixDQ's bits with learned rounding;
`mixdq quantize --method` offers them, and a default study leaves them out (they take hours at full
settings; ``mixdq demo --methods`` opts in). Q-Diffusion, PTQD and EDA-DM quantize
uniformly without BOS handling, as naive PTQ; Q-Diffusion starts its reconstruction from
its quantizers' searched clipping ranges (`RangeSearch`: Lp error, p = 2.4, 80 ratios of the
min/max, per weight channel and activation tensor); PTQD is Q-Diffusion's search and
reconstruction plus its noise correction (its experiments start from BRECQ/AdaRound-calibrated
models), fitted as the authors' released code fits it; EDA-DM is the same search and
reconstruction with TDAC and layer losses at the settings of the authors' released MS-COCO
run (TDAC lambda 5, layer weight 0.8, 256 calibration prompts, their learning rates, p = 2).
``LOWRANK_ROWS``: beyond the paper, SVDQuant's format (groups of 64, smoothing, a 16-bit
rank-32 branch; `format.LOWRANK`): ``svdquant`` (every layer at the target but its 16-bit
ones, no BOS handling, as SVDQuant) and ``mixdq+lowrank`` (MixDQ's metric-decoupled search,
protection and BOS handling in that format: its 4-bit layers carry the branch).
``VARIANT_ROWS``: labelled options, not table rows: ``qdiffusion-minmax`` (Q-Diffusion's
reconstruction from min/max ranges, our earlier row), ``ptqd-pooled`` (our earlier pooled PTQD
fit, no range search) and ``edadm-testbed`` (the testbed's shortened EDA-DM: lambda 50 and
weight 0.5, the argument parser's defaults, on the run's own calibration prompts and
``--recon-*`` settings, no range search).
"""

from __future__ import annotations

from mixdq_jax.methods.format import FP8, LOWRANK
from mixdq_jax.methods.method import Method
from mixdq_jax.methods.mixdq import MixDQGroups
from mixdq_jax.methods.ptqd import PTQDCorrection
from mixdq_jax.methods.range_search import RangeSearch
from mixdq_jax.methods.reconstruction import BlockReconstruction
from mixdq_jax.methods.registry import get_method, register_method
from mixdq_jax.methods.sqnr import SqnrProgram
from mixdq_jax.methods.svdquant import KeepUniform
from mixdq_jax.methods.uniform import Uniform

_UNIFORM, _SQNR, _MIXDQ = Uniform(), SqnrProgram(), MixDQGroups()

PAPER_ROWS = ("naive", "naive+bos", "sqnr-mp", "fp8", "fp8+bos", "mixdq-no-bos", "mixdq")
RECONSTRUCTION_ROWS = ("qdiffusion", "ptqd", "mixdq+adaround", "edadm")
VARIANT_ROWS = ("qdiffusion-minmax", "ptqd-pooled", "edadm-testbed")
LOWRANK_ROWS = ("svdquant", "mixdq+lowrank")

# EDA-DM's released Stable Diffusion run (BienLuky/EDA-DM scripts/for_coco.sh l. 9 and 17-18:
# --lamda 5.0 --add_loss 0.8 --calib_num_samples 256 --lr_a 1e-4, --lr_w 3e-2 at W4A8 and
# 5e-4 at W8A8) and the testbed's shortened one (scripts/task_config.py l. 193 and 196 are
# the parser defaults 0.5 and 50 that script overrides)
_EDADM_RELEASED = BlockReconstruction(
    calib_select=True, layer_loss_weight=0.8, tdac_lambda=5.0, calib_samples=256,
    weight_lr=3e-2, weight_lr_w8=5e-4, act_lr=1e-4, p=2.0,  # sample_txt2img.py l. 197
    label="EDA-DM released (for_coco.sh)",
)  # fmt: skip
_EDADM_TESTBED = BlockReconstruction(
    calib_select=True, layer_loss_weight=0.5, tdac_lambda=50.0,
    label="EDA-DM testbed (shortened)",
)  # fmt: skip

for _method in (
    Method(name="naive", title="naive PTQ", allocator=_UNIFORM, bos_aware=False),
    Method(name="naive+bos", title="+BOS", allocator=_UNIFORM),
    Method(name="sqnr-mp", title="+MP (SQNR)", allocator=_SQNR),
    Method(name="fp8", title="FP8 e4m3", allocator=_UNIFORM, format=FP8, bos_aware=False),
    Method(name="fp8+bos", title="FP8 e4m3 + BOS", allocator=_UNIFORM, format=FP8),
    Method(name="mixdq-no-bos", title="MixDQ w/o BOS (MP-only)", allocator=_MIXDQ,
           bos_aware=False),
    Method(name="mixdq", title="MixDQ", allocator=_MIXDQ),
    Method(name="qdiffusion", title="Q-Diffusion", allocator=_UNIFORM, bos_aware=False,
           refiners=(RangeSearch(), BlockReconstruction())),
    Method(name="ptqd", title="PTQD", allocator=_UNIFORM, bos_aware=False,
           refiners=(RangeSearch(), BlockReconstruction(), PTQDCorrection(rule="released"))),
    Method(name="mixdq+adaround", title="MixDQ + AdaRound", allocator=_MIXDQ,
           refiners=(BlockReconstruction(),)),
    Method(name="edadm", title="EDA-DM", allocator=_UNIFORM, bos_aware=False,
           refiners=(RangeSearch(), _EDADM_RELEASED)),
    Method(name="qdiffusion-minmax", title="Q-Diffusion (min/max ranges)", allocator=_UNIFORM,
           bos_aware=False, refiners=(BlockReconstruction(),)),
    Method(name="ptqd-pooled", title="PTQD (pooled fit)", allocator=_UNIFORM,
           bos_aware=False, refiners=(BlockReconstruction(), PTQDCorrection(rule="pooled"))),
    Method(name="edadm-testbed", title="EDA-DM (testbed, shortened)", allocator=_UNIFORM,
           bos_aware=False, refiners=(_EDADM_TESTBED,)),
    Method(name="svdquant", title="SVDQuant", allocator=KeepUniform(), format=LOWRANK,
           bos_aware=False),
    Method(name="mixdq+lowrank", title="MixDQ + low-rank branch", allocator=_MIXDQ,
           format=LOWRANK),
):  # fmt: skip
    register_method(_method)

METHODS: dict[str, Method] = {name: get_method(name) for name in PAPER_ROWS}
RECONSTRUCTION_METHODS: dict[str, Method] = {name: get_method(name) for name in RECONSTRUCTION_ROWS}
