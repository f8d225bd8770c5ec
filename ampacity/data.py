"""Where the public traces live.

The traces are not part of the repository: they sit in `shared/data/` beside it
(see that folder's README for sources and licenses). `AMPACITY_DATA` overrides.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The folder that holds the public traces (`azure-llm-2023/`, `mooncake/`, ...)."""
    override = os.environ.get("AMPACITY_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def trace_path(*parts: str) -> Path:
    """A file inside the data folder, with a clear error when the traces are missing."""
    path = data_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"trace file {path} not found; set AMPACITY_DATA to the folder holding the public traces"
        )
    return path
