"""Device names -> ``torch.device``: the one place that checks ``auto``/``cpu``/``cuda``/``cuda:<i>``."""

from __future__ import annotations

import torch

__all__ = ["cuda_devices", "resolve_device"]

_EXPECTED = "device must be 'auto', 'cpu', 'cuda' or 'cuda:<i>'"


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:<i>"`` are checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{_EXPECTED}, got {device!r}") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{_EXPECTED}, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available (use 'cpu' or 'auto')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def cuda_devices(dev: torch.device) -> list[torch.device]:
    """``[dev]`` for a CUDA device, else ``[]`` (the ``devices`` argument of ``torch.random.fork_rng``)."""
    return [dev] if dev.type == "cuda" else []
