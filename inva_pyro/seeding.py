"""Seeded random draws made on a given device, away from the global RNG (which training owns)."""
from __future__ import annotations

import torch


def seeded_generator(device, seed: int) -> torch.Generator:
    """A generator for draws made on ``device``, seeded. Meta tensors (tests/test_device.py), which
    have no generator of their own, draw with a CPU one."""
    device = torch.device(device)
    return torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(int(seed))
