"""Region tables: named regions of a table whose rows are subjects (FreeSurfer aparcstats2table's layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...errors import InputError
from ..io import load_region_table, save_region_table


@dataclass(eq=False)
class RegionSpace:
    """Named regions, read from tables whose rows are subjects (aparcstats2table layout).

    A subject's vector is its row (found by subject id in the table's first column) at the
    columns ``regions``, in this order, whatever the column order of a later table; extra
    columns in a later table are ignored, missing ones are an error. ``id_column`` is the
    header of the first column, written back on outputs.
    """

    regions: tuple[str, ...]
    id_column: str = "subject"

    kind: ClassVar[str] = "regions"
    extension: ClassVar[str] = ".csv"

    def __post_init__(self) -> None:
        self.regions = tuple(str(r) for r in self.regions)
        if not self.regions:
            raise ValueError("RegionSpace needs at least one region")
        if len(set(self.regions)) != len(self.regions):
            raise ValueError("RegionSpace region names must be unique")
        self._index: dict[tuple[str, ...], np.ndarray] = {}

    @property
    def n_features(self) -> int:
        return len(self.regions)

    @property
    def grid_shape(self) -> None:
        """None: regions are not on a grid (no SSIM, no slice figures)."""
        return None

    def neighbour_pairs(self) -> None:
        """None: a table says nothing of which regions touch (no spatial smoothing prior)."""
        return None

    def _columns(self, table, path: Path, what: str) -> np.ndarray:
        """Positions of this space's regions in ``table`` (cached per column layout)."""
        columns = self._index.get(table.regions)
        if columns is None:
            position = {region: j for j, region in enumerate(table.regions)}
            missing = [region for region in self.regions if region not in position]
            if missing:
                shown = ", ".join(f"'{r}'" for r in missing[:3]) + (", ..." if len(missing) > 3 else "")
                raise InputError(f"{path}: {what} lacks {len(missing)} of the cohort's "
                                 f"{len(self.regions)} regions ({shown})")
            columns = np.array([position[region] for region in self.regions], dtype=np.int64)
            self._index[table.regions] = columns
        return columns

    def read(self, path: str | Path, what: str = "region table", subject: str | None = None) -> np.ndarray:
        """The (V,) float32 vector of ``subject``'s row (or of the only row, when subject is None)."""
        path = Path(path)
        table = load_region_table(path, what)
        if subject is None:
            if len(table.ids) != 1:
                raise InputError(f"{path}: {what} has {len(table.ids)} rows; say which subject to read")
            row = 0
        else:
            row = table.row(subject)
            if row is None:
                raise InputError(f"{path}: {what} has no row for subject '{subject}' "
                                 f"(first column '{table.id_column}')")
        vector = table.values[row, self._columns(table, path, what)]
        bad = ~np.isfinite(vector)
        if bad.any():
            first = self.regions[int(np.flatnonzero(bad)[0])]
            raise InputError(f"{path}: {what} has {int(bad.sum())} missing or NaN/Inf value(s) for "
                             f"subject '{table.ids[row]}' (e.g. region '{first}')")
        return vector.astype(np.float32)

    def check_file(self, path, what: str = "region table", subject: str | None = None) -> None:
        self.read(path, what, subject)  # tables are small and cached

    def write(self, vector: np.ndarray, path: str | Path) -> list[Path]:
        """Write a (V,) vector as a one-row CSV with the same region names (first cell: the file's
        name without extension, under the input's id-column header)."""
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.n_features,):
            raise ValueError(f"expected a vector of {self.n_features} features, got shape {vector.shape}")
        save_region_table(vector, self.regions, path, id_column=self.id_column)
        return [Path(path)]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "regions": list(self.regions), "id_column": self.id_column}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RegionSpace":
        return cls(regions=tuple(d["regions"]), id_column=str(d.get("id_column", "subject")))
