"""Each site's input intensities brought to one scale: a gain and a smooth offset field per site and input.

Scanners differ in how they render the same tissue: an MRI map from one site is, to a good approximation,
another site's map times a gain, plus an offset that varies slowly across the brain (a bias field that
the preprocessing left behind). For site s and input k this module assumes

    x_obs(v) = g_sk x(v) + f_sk(v),   f_sk smooth (a polynomial of degree ``degree`` in the coordinates),

and undoes it: ``x_harmonised(v) = x_obs(v) / g_sk - d_sk(v)``, on the scale of the reference, the
training sites together. The gain is the ratio of the site's within-site sd (each feature's sd over the
site's subjects, averaged over features as a variance) to the reference sd; the offset field d_sk is the
site's mean image over gain minus the reference mean image, projected on the smooth basis. Projecting
keeps what a scanner does and leaves the subjects' anatomy: a site's mean image estimated from 30
subjects is noisy feature by feature, but its projection on a few smooth fields is not.

Unlike ComBat, which fits a location and a scale per feature, this fits a few numbers per site (1 gain
and up to 20 polynomial coefficients per input), so a new site is harmonised from its own images with few
subjects, and no outcome is needed. What it assumes: the sites' subjects come from the same population
(a site whose subjects differ in a smooth pattern of the mean has part of it taken for a scanner effect),
and features without coordinates (region tables) get a constant offset only.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import InputError
from .missing import row_present

DEGREE = 3          # bias fields are smooth: cubic polynomials in the coordinates (20 terms in 3-d)
MIN_SUBJECTS = 5    # fewest subjects with an input for a site's gain and field to be estimated


def monomials(coordinates: np.ndarray | None, n_features: int, degree: int) -> np.ndarray:
    """(V, B) float64: every monomial of the standardised coordinates up to ``degree`` (constant first);
    coordinates that do not vary (a 2-d grid's third axis) are left out. Without coordinates: the constant."""
    columns = [np.ones(n_features)]
    if coordinates is None or degree < 1:
        return np.stack(columns, axis=1)
    c = np.asarray(coordinates, dtype=np.float64)
    spread = c.std(axis=0)
    c = (c[:, spread > 0] - c[:, spread > 0].mean(axis=0)) / spread[spread > 0]
    for d in range(1, degree + 1):
        for powers in itertools.combinations_with_replacement(range(c.shape[1]), d):
            columns.append(np.prod(c[:, list(powers)], axis=1))
    return np.stack(columns, axis=1)


def _site_moments(matrix: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The site's mean image and within-site sd (root mean over features of the variance), over the rows
    that hold the image; None with fewer than MIN_SUBJECTS."""
    x = np.asarray(matrix[rows], dtype=np.float64)
    x = x[row_present(x)]
    if len(x) < MIN_SUBJECTS:
        return None
    return x.mean(axis=0), float(np.sqrt(x.var(axis=0, ddof=1).mean()))


@dataclass
class SiteIntensity:
    """Per input: the reference mean image and sd, and per site its gain and offset-field coefficients
    (module docstring). ``bases``: input -> (V_k, B_k) monomials, rebuilt from the feature spaces on load."""

    degree: int
    reference_mean: dict[str, np.ndarray]
    reference_sd: dict[str, float]
    sites: dict[str, dict[str, dict]] = field(default_factory=dict)   # site -> input -> {gain, offset}
    bases: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def fit(cls, subset, degree: int = DEGREE) -> "SiteIntensity":
        """The reference from every site of ``subset`` with enough subjects, and each such site's terms."""
        labels = _labels(subset)
        bases = {name: monomials(_coordinates(subset, name), m.shape[1], degree)   # (a LazyMatrix is not read)
                 for name, m in subset.inputs.items()}
        reference_mean, reference_sd, terms = {}, {}, {}
        for name, matrix in subset.inputs.items():
            moments = {s: _site_moments(matrix, labels == s) for s in sorted(set(labels) - {""})}
            moments = {s: m for s, m in moments.items() if m is not None}
            if not moments:
                raise InputError(f"site intensities: no site has {MIN_SUBJECTS} subjects with input '{name}'")
            weights = {s: int(np.sum(labels == s)) for s in moments}
            total = sum(weights.values())
            reference_sd[name] = float(np.exp(sum(w * np.log(moments[s][1]) for s, w in weights.items()) / total))
            reference_mean[name] = sum(w * moments[s][0] * reference_sd[name] / moments[s][1]
                                       for s, w in weights.items()) / total
            for site, (mean, sd) in moments.items():
                terms.setdefault(site, {})[name] = _terms(mean, sd, reference_mean[name], reference_sd[name],
                                                           bases[name])
        return cls(degree, reference_mean, reference_sd, terms, bases)

    def with_new_sites(self, subset) -> "SiteIntensity":
        """A copy that also harmonises the sites of ``subset`` it does not know, from their own images
        against the stored reference (no outcome used); a site with too few subjects is left pooled."""
        labels, terms = _labels(subset), {s: dict(t) for s, t in self.sites.items()}
        for site in sorted(set(labels) - {""} - set(self.sites)):
            for name, matrix in subset.inputs.items():
                moments = _site_moments(matrix, labels == site) if name in self.reference_mean else None
                if moments is not None:
                    terms.setdefault(site, {})[name] = _terms(*moments, self.reference_mean[name],
                                                               self.reference_sd[name], self.bases[name])
        return SiteIntensity(self.degree, self.reference_mean, self.reference_sd, terms, self.bases)

    def transform(self, name: str, matrix: np.ndarray, sites) -> np.ndarray:
        """(n, V) input ``name`` on the reference scale; subjects of a site without terms (unseen, empty
        cell) are returned as they are, which is the pooled site's scale."""
        out = np.array(matrix, dtype=np.float32, copy=True)
        if sites is None:
            return out
        labels = _site_labels(sites)
        for site, by_input in self.sites.items():
            rows, term = labels == site, by_input.get(name)
            if term is None or not rows.any():
                continue
            field_ = self.bases[name] @ np.asarray(term["offset"], dtype=np.float64)
            out[rows] = (out[rows].astype(np.float64) / term["gain"] - field_).astype(np.float32)
        return out

    def to_dict(self) -> dict:
        return {"degree": self.degree, "sites": self.sites,
                "reference_sd": self.reference_sd,
                "reference_mean": {k: np.asarray(v, dtype=np.float32).tolist() for k, v in self.reference_mean.items()}}

    @classmethod
    def from_dict(cls, d: dict, coordinates: dict[str, np.ndarray | None]) -> "SiteIntensity":
        """Rebuild from ``to_dict()``; ``coordinates``: input -> (V, 3) feature coordinates or None, as fitted."""
        means = {k: np.asarray(v, dtype=np.float64) for k, v in d["reference_mean"].items()}
        bases = {k: monomials(coordinates.get(k), len(m), int(d["degree"])) for k, m in means.items()}
        return cls(int(d["degree"]), means, {k: float(v) for k, v in d["reference_sd"].items()},
                   d["sites"], bases)


def _terms(mean: np.ndarray, sd: float, reference_mean: np.ndarray, reference_sd: float,
           basis: np.ndarray) -> dict:
    """One site's gain (its sd over the reference's) and the coefficients of its offset field (its mean over
    its gain, minus the reference mean, projected on the basis by least squares)."""
    gain = sd / reference_sd
    offset, *_ = np.linalg.lstsq(basis, mean / gain - reference_mean, rcond=None)
    return {"gain": float(gain), "offset": offset.tolist()}


def _empty(value) -> bool:
    return bool(pd.isna(value))


def _labels(subset) -> np.ndarray:
    if subset.sites is None:
        raise InputError("site intensities: the subjects have no site (Cohort.from_manifest(..., site=COLUMN))")
    return _site_labels(subset.sites)


def _site_labels(sites) -> np.ndarray:
    """(n,) object array: each site as text, "" for an empty cell."""
    return np.array(["" if _empty(s) else str(s) for s in sites], dtype=object)


def _coordinates(subset, name: str) -> np.ndarray | None:
    """The input's feature coordinates where its space has them (volumes), else None (a constant offset)."""
    space = (subset.spaces or {}).get(name)
    coordinates = getattr(space, "feature_coordinates", None)
    return coordinates() if callable(coordinates) else None


def outcome_site_start(subset, levels: list[str], standardizer) -> tuple[np.ndarray, np.ndarray]:
    """Each site's outcome offset (in units of the outcome's typical scale, the median of ``standardizer``'s)
    and log gain in image units, y = a_s + b_s y0, from its labeled subjects' outcome images as the inputs'
    gains and (constant) offsets are found: where the model's site calibration starts (model/conditions.py).
    Sites with too few labeled subjects start at 0, 0."""
    typical_scale = float(np.median(standardizer.outcome_scale))
    offset, log_gain = np.zeros(len(levels)), np.zeros(len(levels))
    outcome = dataclasses.replace(subset, inputs={"outcome": subset.outcome}, spaces={})
    try:
        terms = SiteIntensity.fit(outcome, degree=0).sites
    except InputError:   # no site with enough labeled subjects
        return offset, log_gain
    for i, level in enumerate(levels):
        term = terms.get(level, {}).get("outcome")
        if term is not None:
            offset[i] = term["gain"] * term["offset"][0] / typical_scale
            log_gain[i] = np.log(term["gain"])
    return offset, log_gain
