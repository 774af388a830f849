"""Mixed-precision bit allocation (MixDQ Sec. 3.3 and Algorithm 1).

``BitProgram`` is one group's integer program, solved to a zero relative gap;
``GroupAllocator`` splits an overall budget between the content and quality groups (by one of
the `BUDGET_RULES`) and sweeps (B, k); ``pareto_front`` / ``select`` keep
and pick among the candidates; ``random_allocation`` / ``naive_sorting`` are the paper's
baselines.
"""

from mixdq_jax.allocation.budget import (
    ACT_K_SWEEP,
    BUDGET_RULES,
    OFFICIAL_BUDGET_RANGE,
    OFFICIAL_CANDIDATES,
    WEIGHT_K_SWEEP,
    Candidate,
    GroupAllocator,
    budget_sweep,
    is_content_layer,
    most_sensitive,
    size_ratio,
    split_budget,
    split_groups,
)
from mixdq_jax.allocation.driver import AllocationOptions, group_candidates, protected_layers
from mixdq_jax.allocation.milp import (
    DEFAULT_BAND,
    Allocation,
    BitProgram,
    InfeasibleBudget,
    allocate_group,
    average_bits,
    summed_sensitivity,
)
from mixdq_jax.allocation.pareto import (
    naive_sorting,
    pareto_front,
    perturb,
    random_allocation,
    select,
)

__all__ = [
    "ACT_K_SWEEP",
    "BUDGET_RULES",
    "DEFAULT_BAND",
    "OFFICIAL_BUDGET_RANGE",
    "OFFICIAL_CANDIDATES",
    "WEIGHT_K_SWEEP",
    "Allocation",
    "AllocationOptions",
    "BitProgram",
    "Candidate",
    "GroupAllocator",
    "InfeasibleBudget",
    "allocate_group",
    "average_bits",
    "budget_sweep",
    "group_candidates",
    "is_content_layer",
    "most_sensitive",
    "naive_sorting",
    "pareto_front",
    "perturb",
    "protected_layers",
    "random_allocation",
    "select",
    "size_ratio",
    "split_budget",
    "split_groups",
    "summed_sensitivity",
]
