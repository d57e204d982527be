"""What every figure shares: a matplotlib Figure on the Agg canvas (no pyplot, no display, nothing left
registered after saving), atomic PNG writes, and the slice and colour range shown for a grid image.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.io import _umask


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the PNG the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def display_slice(image: np.ndarray) -> np.ndarray:
    """A 2-D image to show: the image itself, or the middle axial (last-axis) slice of a volume.

    Transposed so that, with origin="lower", the first array axis runs left to right and the
    second bottom to top, which is the radiological convention for RAS-ordered arrays.
    """
    if image.ndim == 3:
        image = image[:, :, image.shape[2] // 2]
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D or 3-D grid, got shape {image.shape}")
    return image.T


def finite_range(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([a[np.isfinite(a)] for a in arrays])
    if values.size == 0:
        return 0.0, 1.0
    return float(values.min()), float(values.max())
