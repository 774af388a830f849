"""Shared references for the evaluation tests (see torchmetrics_import.py for why torch-fidelity
is imported the way it is)."""

from __future__ import annotations

import pytest

from tests.evaluation.torchmetrics_import import import_fidelity_inception


@pytest.fixture(scope="session")
def torch_fidelity_inception():
    """torch-fidelity's FID Inception module, the reference for `mixdq_jax.evaluation.inception`."""
    return import_fidelity_inception()
