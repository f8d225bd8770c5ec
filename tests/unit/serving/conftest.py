"""Shared fixtures: the public traces, skipped with a reason when the data folder is absent."""

from __future__ import annotations

import pytest

from ampacity.data import data_dir
from ampacity.serving.workload import Workload, load_azure


@pytest.fixture(scope="session")
def traces_present() -> None:
    if not data_dir().exists():
        pytest.skip(f"public traces not found at {data_dir()} (set AMPACITY_DATA)")


@pytest.fixture(scope="session")
def azure(traces_present: None) -> Workload:
    return load_azure()
