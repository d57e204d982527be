"""GIfTI surfaces: per-vertex maps of one hemisphere, or a left/right pair read as one image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...errors import InputError
from ..io import load_gifti_map, save_gifti_map


# GIfTI structure names of the two cortical hemispheres, and the short labels used in
# column and file names (FreeSurfer's lh./rh. prefixes).
HEMISPHERES = {"lh": "CortexLeft", "rh": "CortexRight"}
_LABEL_OF_STRUCTURE = {structure: label for label, structure in HEMISPHERES.items()}


# Vertices per hemisphere of the one mesh nilearn ships (no download): fsaverage5.
FSAVERAGE5_VERTICES = 10242


def mesh_edges(faces: np.ndarray) -> np.ndarray:
    """(E, 2) int64 vertex pairs (i < j) joined by an edge of a triangle mesh, each edge once."""
    faces = np.asarray(faces, dtype=np.int64)
    pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return np.unique(np.sort(pairs, axis=1), axis=0)


def fsaverage5_edges(hemisphere: str) -> np.ndarray:
    """Edges of nilearn's fsaverage5 mesh of one hemisphere ("lh" or "rh"), read from nilearn's
    installed data."""
    from nilearn import datasets

    mesh = datasets.load_fsaverage("fsaverage5")
    return mesh_edges(mesh["pial"].parts["left" if hemisphere == "lh" else "right"].faces)


def surface_sources(source: str | Path | tuple) -> tuple[Path, ...]:
    """A surface image's files: one path, or the (left, right) pair of paths."""
    if isinstance(source, (tuple, list)):
        return tuple(Path(p) for p in source)
    return (Path(source),)


@dataclass(eq=False)
class SurfaceSpace:
    """Vertices of one or two surface meshes (GIfTI per-vertex maps).

    ``parts`` lists ``(label, n_vertices)`` per file: one part for a map given as a single
    GIfTI per subject, or ``("lh", n_left), ("rh", n_right)`` for a hemisphere pair (two
    manifest columns NAME_lh and NAME_rh). Features are the parts' vertices in order, so a
    pair is the left hemisphere's vertices followed by the right's. ``structures`` keeps each
    part's GIfTI AnatomicalStructurePrimary (e.g. CortexLeft) to write it back on outputs.
    """

    parts: tuple[tuple[str, int], ...]
    structures: tuple[str | None, ...] = ()

    kind: ClassVar[str] = "surface"
    extension: ClassVar[str] = ".gii"

    def __post_init__(self) -> None:
        self.parts = tuple((str(label), int(n)) for label, n in self.parts)
        if not self.parts or any(n < 1 for _, n in self.parts):
            raise ValueError(f"SurfaceSpace needs parts with vertices, got {self.parts}")
        labels = [label for label, _ in self.parts]
        if len(set(labels)) != len(labels):
            raise ValueError(f"SurfaceSpace part labels must differ, got {labels}")
        structures = tuple(self.structures) or tuple(HEMISPHERES.get(label) for label in labels)
        if len(structures) != len(self.parts):
            raise ValueError("SurfaceSpace needs one structure per part")
        self.structures = structures

    @classmethod
    def from_maps(cls, maps: list[tuple[np.ndarray, str | None]], labels: tuple[str, ...] | None = None):
        """The space of one subject's loaded maps (``load_gifti_map`` results), one per part."""
        if labels is None:
            if len(maps) != 1:
                raise ValueError("labels are needed for several parts")
            labels = (_LABEL_OF_STRUCTURE.get(maps[0][1], "surface"),)
        return cls(parts=tuple((label, data.size) for label, (data, _) in zip(labels, maps)),
                   structures=tuple(structure or HEMISPHERES.get(label) for label, (_, structure)
                                    in zip(labels, maps)))

    @property
    def n_features(self) -> int:
        return sum(n for _, n in self.parts)

    @property
    def grid_shape(self) -> None:
        """None: vertices are not on a grid (no SSIM, no slice figures)."""
        return None

    def neighbour_pairs(self) -> np.ndarray | None:
        """(E, 2) int64 feature indices joined by a mesh edge, for the parts that are fsaverage5
        hemispheres (10242 vertices, left or right); None when no part is. Other meshes are not
        known here: GIfTI maps carry values, not the surface they lie on."""
        pairs, offset = [], 0
        for (label, n), structure in zip(self.parts, self.structures):
            hemisphere = _LABEL_OF_STRUCTURE.get(structure)
            if n == FSAVERAGE5_VERTICES and hemisphere is not None:
                pairs.append(fsaverage5_edges(hemisphere) + offset)
            offset += n
        return np.concatenate(pairs) if pairs else None

    @property
    def n_vertices(self) -> dict[str, int]:
        return dict(self.parts)

    def split(self, vector: np.ndarray) -> list[np.ndarray]:
        """A (..., V) array cut into its parts' (..., n_vertices) pieces."""
        vector = np.asarray(vector)
        if vector.shape[-1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got shape {vector.shape}")
        bounds = np.cumsum([0] + [n for _, n in self.parts])
        return [vector[..., a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def read(self, path: str | Path | tuple, what: str = "surface map",
             subject: str | None = None) -> np.ndarray:
        """The (V,) float32 vector of one subject's file(s): a path, or the (left, right) pair."""
        paths = surface_sources(path)
        if len(paths) != len(self.parts):
            raise InputError(f"{paths[0]}: {what} is {len(paths)} file(s); this surface space has "
                             f"{len(self.parts)} part(s) ({', '.join(label for label, _ in self.parts)})")
        pieces = []
        for file, (label, n) in zip(paths, self.parts):
            data, _ = load_gifti_map(file, what)
            if data.size != n:
                where = "" if len(self.parts) == 1 else f" ({label})"
                raise InputError(f"{file}: {what}{where} has {data.size} vertices; the cohort's "
                                 f"surface has {n}")
            bad = ~np.isfinite(data)
            if bad.any():
                raise InputError(f"{file}: {what} has {int(bad.sum())} NaN/Inf vertex value(s)")
            pieces.append(data)
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def check_file(self, path, what: str = "surface map", subject: str | None = None) -> None:
        self.read(path, what)  # GIfTI has no separate header: checking is reading (small files)

    def output_paths(self, path: str | Path) -> list[Path]:
        """The files ``write(vector, path)`` makes: ``path`` itself for one part, else
        ``{stem}_lh.gii`` and ``{stem}_rh.gii`` beside it for a hemisphere pair."""
        path = Path(path)
        if len(self.parts) == 1:
            return [path]
        stem = path.name[: -len(".gii")] if path.name.endswith(".gii") else path.name
        return [path.with_name(f"{stem}_{label}.gii") for label, _ in self.parts]

    def write(self, vector: np.ndarray, path: str | Path) -> list[Path]:
        """Write a (V,) vector as float32 GIfTI map(s) with the input's vertex counts."""
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.n_features,):
            raise ValueError(f"expected a vector of {self.n_features} features, got shape {vector.shape}")
        paths = self.output_paths(path)
        for file, piece, structure in zip(paths, self.split(vector), self.structures):
            save_gifti_map(piece, file, structure)
        return paths

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "parts": [[label, n] for label, n in self.parts],
                "structures": list(self.structures)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SurfaceSpace":
        return cls(parts=tuple((label, int(n)) for label, n in d["parts"]),
                   structures=tuple(d.get("structures") or ()))
