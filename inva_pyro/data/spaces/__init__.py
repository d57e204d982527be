"""Feature spaces: how one subject's feature vector maps to and from an image file.

The model sees every image as a vector of V features. A *space* knows which file
positions those features come from (the voxels inside a mask, for volumes) and how to
write a vector back as a file in the input's own format. A run folder stores its spaces
with ``to_dict`` (JSON, no pickle) and rebuilds them with ``space_from_dict``.

Four kinds, with the same methods (``n_features``, ``extension``, ``grid_shape``,
``read``, ``write``, ``to_dict``/``from_dict``), registered in ``SPACE_KINDS``:

- ``VolumeSpace``: NIfTI voxels inside a mask, read through nibabel proxies and nilearn masking;
- ``SurfaceSpace``: GIfTI per-vertex maps, one hemisphere or a left/right pair;
- ``RegionSpace``: named regions of a table whose rows are subjects (aparcstats2table layout);
- ``ArraySpace``: in-memory arrays of unknown geometry, written as (V, 1, 1) volumes.

``grid_shape`` is the 2-D/3-D grid SSIM and slice figures need, or None when the features do
not lie on a grid (surfaces, regions, arrays). ``write`` returns the paths it wrote.
"""

from __future__ import annotations

from typing import Any
from pathlib import Path

from ...errors import InputError
from .regions import RegionSpace
from .surface import HEMISPHERES, SurfaceSpace, surface_sources
from .volume import AFFINE_ATOL, ArraySpace, VolumeSpace, load_mask

__all__ = ["AFFINE_ATOL", "ArraySpace", "HEMISPHERES", "RegionSpace", "SPACE_KINDS", "Space", "SurfaceSpace",
           "VolumeSpace", "load_mask", "space_from_dict", "surface_sources"]

Space = VolumeSpace | ArraySpace | SurfaceSpace | RegionSpace

# kind -> class with from_dict.
SPACE_KINDS: dict[str, type] = {cls.kind: cls for cls in (VolumeSpace, ArraySpace, SurfaceSpace, RegionSpace)}


def space_from_dict(d: dict[str, Any], source: str | Path = "space") -> Space:
    """Rebuild a space saved with ``to_dict``; ``source`` names the file in error messages."""
    if not isinstance(d, dict) or "kind" not in d:
        raise InputError(f"{source}: not a saved space (no 'kind')")
    cls = SPACE_KINDS.get(d["kind"])
    if cls is None:
        raise InputError(f"{source}: unknown space kind {d['kind']!r} (known: {', '.join(SPACE_KINDS)})")
    try:
        return cls.from_dict(d)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputError(f"{source}: corrupt {d['kind']} space ({exc})") from None
