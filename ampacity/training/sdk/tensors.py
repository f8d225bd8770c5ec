"""Framework-agnostic arrays: numpy first-class, torch tensors when torch is installed.

torch is never imported unless a tensor is seen (or asked for on load), so the SDK runs
in numpy-only images. bfloat16 has no numpy dtype: it travels as its raw 16 bits and the
manifest remembers the torch dtype to view it back.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np


def is_torch_tensor(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def to_numpy(value: Any) -> tuple[np.ndarray, str | None]:
    """A numpy view or host copy of `value`, and its torch dtype name when it was a tensor."""
    if is_torch_tensor(value):
        torch = importlib.import_module("torch")
        tensor = value.detach()
        torch_dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        return np.ascontiguousarray(tensor.cpu().numpy()), torch_dtype
    return np.ascontiguousarray(np.asarray(value)), None


def from_numpy(array: np.ndarray, torch_dtype: str | None, *, as_torch: bool) -> Any:
    """Back to a torch tensor (of the saved dtype) when asked, else the numpy array."""
    if not as_torch:
        return array
    torch = importlib.import_module("torch")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch_dtype == "bfloat16":
        return tensor.view(torch.bfloat16)
    return tensor
