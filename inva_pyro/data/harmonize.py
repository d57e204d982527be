"""ComBat harmonisation of the input images by site (docs/cohorts.md, "Harmonising sites with ComBat").

ComBat (Johnson et al. 2007; Fortin et al. 2017, 2018) models each feature v of an image (a voxel, vertex or
region) of subject i at site s as

    x_iv = alpha_v + c_i' beta_v + gamma_sv + sqrt(delta_sv) * sigma_v * e_iv,

a location shift gamma_sv and a scale delta_sv of every feature per site on top of the feature's mean
alpha_v, its covariate effects beta_v and its pooled sd sigma_v. The site effects are estimated per feature
and then shrunk towards what the other features of the same site show (empirical Bayes: a normal prior on
gamma and an inverse-gamma prior on delta per site, fitted across features), which steadies them for small
sites. Harmonising removes them, ``(x - alpha - c'beta - gamma) / sqrt(delta) + alpha + c'beta``, so
every site comes out with one location and one scale per feature while the covariates' effects, estimated
together with the site effects, are kept. The estimates come from the field's library ``neuroCombat``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import InputError
from .covariates import is_numeric
from .missing import row_present
from .subset import Subset

NUMERIC, CATEGORICAL = "numeric", "categorical"
MIN_PER_SITE = 2   # a site needs a within-site variance
FORMAT = "inva-combat"
_ARRAYS = ("features", "var_pooled", "stand_mean", "beta", "design_mean", "gamma", "delta")


def _site_labels(subset, action: str) -> np.ndarray:
    """(n,) object array of site labels as text (``str`` of each cell, as ``SiteLevels``); empty cells: error."""
    if subset.sites is None:
        raise InputError(f"ComBat: cannot {action} a subset without sites (Cohort.from_manifest(..., site=COLUMN))")
    empty = [s for s, v in zip(subset.subjects, subset.sites) if pd.isna(v)]
    if empty:
        raise InputError(f"ComBat: subject '{empty[0]}' has an empty site cell (column '{subset.sites.name}'; "
                         f"{len(empty)} subject(s) in all)")
    return np.array([str(v) for v in subset.sites], dtype=object)


def _covariate_columns(frame: pd.DataFrame | None, names: list[str]) -> list[dict]:
    """What to protect: numeric columns (continuous) and text columns (categorical, one indicator per level
    after the first), each with the value an empty cell is filled with (training mean / most frequent level)."""
    known = [] if frame is None else list(frame.columns)
    missing = [n for n in names if n not in known]
    if missing:
        raise InputError(f"ComBat: no covariate column {', '.join(repr(m) for m in missing)} in the subset's "
                         f"conditions (it has: {', '.join(map(str, known)) or 'none'})")
    columns = []
    for name in names:
        values = frame[name].dropna()
        if values.empty:
            raise InputError(f"ComBat: covariate '{name}' is empty for every subject")
        if is_numeric(values):
            columns.append({"name": name, "kind": NUMERIC, "fill": float(pd.to_numeric(values).mean())})
        else:
            counts = values.astype(str).value_counts()
            levels = sorted(counts.index)
            fill = min(counts.index[counts == counts.max()])   # most frequent; ties: first in order
            columns.append({"name": name, "kind": CATEGORICAL, "levels": levels, "fill": fill})
    return columns


def _design(frame: pd.DataFrame | None, columns: list[dict], subjects) -> np.ndarray:
    """(n, p) float64 covariate design: numbers as they are, text as indicators of every level but the first;
    empty cells filled. Rounded through float32, as neuroCombat rounds its continuous columns."""
    parts = []
    for column in columns:
        if frame is None or column["name"] not in frame.columns:
            raise InputError(f"ComBat: no covariate column '{column['name']}' in the subset's conditions (it "
                             f"was fitted with: {', '.join(c['name'] for c in columns)})")
        values = frame[column["name"]]
        if column["kind"] == NUMERIC:
            try:
                numbers = pd.to_numeric(values).astype(np.float64).to_numpy()
            except (ValueError, TypeError):
                raise InputError(f"ComBat: covariate '{column['name']}' was numeric when fitted and holds text "
                                 "here") from None
            parts.append(np.where(np.isnan(numbers), column["fill"], numbers)[:, None])
            continue
        text = [column["fill"] if pd.isna(v) else str(v) for v in values]
        unseen = [(s, t) for s, t in zip(subjects, text) if t not in column["levels"]]
        if unseen:
            raise InputError(f"ComBat: covariate '{column['name']}' of subject '{unseen[0][0]}' is "
                             f"'{unseen[0][1]}', a level the fit never saw (levels: {', '.join(column['levels'])})")
        parts.append(np.array([[t == level for level in column["levels"][1:]] for t in text], dtype=np.float64)
                     .reshape(len(text), -1))
    design = np.concatenate(parts, axis=1) if parts else np.zeros((len(subjects), 0))
    return design.astype(np.float32).astype(np.float64)


def _present_rows(name: str, matrix, subjects) -> tuple[np.ndarray, np.ndarray]:
    """(rows with the image, their values as float64); a row with some but not all values NaN/Inf: error."""
    array = np.asarray(matrix)
    present = np.flatnonzero(row_present(array))
    values = array[present].astype(np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise InputError(f"ComBat: input '{name}' of subject '{subjects[present[bad][0]]}' holds NaN or Inf in "
                         "some features (a row is either an image or all NaN, not acquired)")
    return present, values


def _check_sites(name: str, labels: np.ndarray, design: np.ndarray, columns: list[dict]) -> np.ndarray:
    """The sites of one image's subjects, sorted; errors when ComBat cannot estimate them."""
    sites, counts = np.unique(labels, return_counts=True)
    if len(sites) < 2:
        raise InputError(f"ComBat: input '{name}' is present at {len(sites)} site(s) only; harmonising needs "
                         "at least 2")
    if counts.min() < MIN_PER_SITE:
        raise InputError(f"ComBat: site '{sites[counts.argmin()]}' has {counts.min()} subject(s) with input "
                         f"'{name}'; ComBat needs at least {MIN_PER_SITE} per site (a within-site variance)")
    full = np.concatenate([(labels[:, None] == sites[None, :]).astype(np.float64), design], axis=1)
    if np.linalg.matrix_rank(full) < full.shape[1]:
        raise InputError(f"ComBat: covariates {', '.join(c['name'] for c in columns)} are confounded with site "
                         f"(or a level is absent) among the {len(labels)} subjects with input '{name}'")
    return sites


def _run_neurocombat(values: np.ndarray, labels: np.ndarray, design: np.ndarray, options: dict) -> dict:
    """neuroCombat on (subjects, features) values, its progress lines silenced; returns its estimates."""
    from neuroCombat import neuroCombat

    covars = pd.DataFrame({"site": pd.Series(labels, dtype=object)})
    continuous = [f"c{j}" for j in range(design.shape[1])]
    for j, col in enumerate(continuous):
        covars[col] = design[:, j]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        if not options["eb"]:   # it computes the priors anyway (NaN from a single feature), then ignores them
            warnings.simplefilter("ignore", RuntimeWarning)
        out = neuroCombat(values.T, covars, "site", continuous_cols=continuous, **options)
    return out["estimates"]


def _fit_image(name: str, values: np.ndarray, labels: np.ndarray, design: np.ndarray, columns: list[dict],
               options: dict) -> dict:
    """One image's estimates over its subjects (``values``: (n, V) float64, every row present)."""
    sites = _check_sites(name, labels, design, columns)
    # A feature constant within a site has no within-site variance to standardise by: it is left as it is.
    varies = np.all([np.ptp(values[labels == s], axis=0) > 0 for s in sites], axis=0)
    features = np.flatnonzero(varies)
    state = {"sites": [str(s) for s in sites], "n_features": int(values.shape[1]), "features": features,
             "eb": bool(options["eb"] and len(features) >= 2)}
    if not len(features):
        m, p, k = 0, design.shape[1], len(sites)
        return {**state, "var_pooled": np.zeros(m), "stand_mean": np.zeros(m), "beta": np.zeros((p, m)),
                "design_mean": design.mean(axis=0), "gamma": np.zeros((k, m)), "delta": np.ones((k, m))}
    # Empirical Bayes borrows across features: with a single one there is nothing to borrow from.
    est = _run_neurocombat(values[:, features], labels, design, {**options, "eb": state["eb"]})
    mod_mean = np.asarray(est["mod.mean"], dtype=np.float64)          # (m, n) = (design @ beta).T
    beta = (np.linalg.lstsq(design, mod_mean.T, rcond=None)[0] if design.shape[1]
            else np.zeros((0, len(features))))
    return {**state, "var_pooled": np.asarray(est["var.pooled"], dtype=np.float64)[:, 0],
            "stand_mean": np.asarray(est["stand.mean"], dtype=np.float64)[:, 0], "beta": beta,
            "design_mean": design.mean(axis=0), "gamma": np.asarray(est["gamma.star"], dtype=np.float64),
            "delta": np.asarray(est["delta.star"], dtype=np.float64)}


def _apply_image(values: np.ndarray, site_index: np.ndarray, design: np.ndarray, state: dict) -> np.ndarray:
    """neuroCombat's final adjustment with stored estimates: (n, m) harmonised values of the fitted features."""
    sd = np.sqrt(state["var_pooled"])
    protected = state["stand_mean"] + design @ state["beta"]
    z = (values - protected) / sd
    z = (z - state["gamma"][site_index]) / np.sqrt(state["delta"][site_index])
    return z * sd + protected


@dataclass
class ComBat:
    """ComBat harmonisation of a subset's input images by site (see the module docstring for the model).

    ``ComBat.fit(subset, covariates=["age", "sex"])`` estimates, per input image, over the subjects that
    have it, the location and scale of each feature per site (``subset.sites``; labels compared as text, as
    ``SiteLevels``), protecting the named columns of ``subset.conditions``: numeric columns as continuous
    covariates, text columns as categorical ones (one indicator per level after the first). An empty
    covariate cell is filled, for the harmonisation only, with the fit's mean of the column (numeric) or its
    most frequent level (text; ties: the first in sorted order); ``subset.conditions`` is never changed.
    ``InputError`` (one line) when the subset has no sites, fewer than 2 sites with an image, a site with
    fewer than 2 subjects with an image (ComBat needs a within-site variance), a named covariate column
    missing, or covariates confounded with site.

    A feature that is constant within a fitted site (a voxel outside the brain, a region a site never
    measures) is left as it is, at every site: ComBat standardises by a within-site variance, and
    neuroCombat would replace a zero one by an arbitrary value and shift the constant per site. An image with
    a single feature left is fitted without empirical Bayes (there are no other features to borrow from).

    ``transform(subset)`` harmonises every input of any subset of the fitted sites (rows of NaN, images not
    acquired, stay NaN); a subject at a site the fit never saw is an ``InputError`` naming the site (refit
    with that site's subjects to harmonise them). Subjects are adjusted with their own covariates, exactly
    as neuroCombat adjusts its training subjects (``transform`` of the fitted subset reproduces
    ``neuroCombat(...)["data"]``). The field's ``neuroCombatFromTraining`` instead gives every new subject the
    training subjects' average covariate effect, ignoring its own covariates; ``transform(subset,
    own_covariates=False)`` does that (a subject's covariate effect minus the average is then scaled by
    1/sqrt(delta) of its site). ``neuroCombatFromTraining`` itself is not called: it is marked as in
    development and fails under numpy 2.

    ``eb``, ``parametric`` and ``mean_only`` are neuroCombat's options (empirical Bayes shrinkage,
    parametric priors, locations only). Non-parametric priors cost features squared: region tables only.
    With ``mean_only`` and ``eb``, neuroCombat (as R's sva) weighs a site's location estimate as one
    observation, so the locations are shrunk almost to the site's average over features.
    """

    options: dict = field(default_factory=lambda: {"eb": True, "parametric": True, "mean_only": False})
    site_column: str | None = None
    covariates: list[dict] = field(default_factory=list)
    images: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def fit(cls, subset: Subset, covariates: list[str] | None = None, *, eb: bool = True, parametric: bool = True,
            mean_only: bool = False) -> "ComBat":
        """The site effects of every input of ``subset`` estimated (see the class docstring)."""
        options = {"eb": bool(eb), "parametric": bool(parametric), "mean_only": bool(mean_only)}
        labels = _site_labels(subset, "fit ComBat on")
        columns = _covariate_columns(subset.conditions, list(covariates or []))
        design = _design(subset.conditions, columns, subset.subjects)
        images = {}
        for name, matrix in subset.inputs.items():
            rows, values = _present_rows(name, matrix, subset.subjects)
            images[name] = _fit_image(name, values, labels[rows], design[rows], columns, options)
        return cls(options, str(subset.sites.name), columns, images)

    def transform(self, subset: Subset, own_covariates: bool = True) -> Subset:
        """``subset`` with every input harmonised (float32; rows of NaN stay NaN; other fields unchanged).

        A subject at a site the fit never saw for an image it has: ``InputError`` naming the site.
        ``own_covariates=False``: the training average of the covariate effect, as neuroCombatFromTraining."""
        if not self.images:
            raise InputError("ComBat: nothing fitted (make one with ComBat.fit(subset))")
        unknown = [name for name in subset.inputs if name not in self.images]
        if unknown:
            raise InputError(f"ComBat: input '{unknown[0]}' was not among the fitted inputs "
                             f"({', '.join(self.images)})")
        labels = _site_labels(subset, "harmonise")
        design = _design(subset.conditions, self.covariates, subset.subjects) if own_covariates else None
        inputs = {name: self._transform_image(name, matrix, labels, design, subset.subjects)
                  for name, matrix in subset.inputs.items()}
        return dataclasses.replace(subset, inputs=inputs)

    def _transform_image(self, name: str, matrix, labels: np.ndarray, design, subjects) -> np.ndarray:
        state = self.images[name]
        array = np.asarray(matrix)
        if array.shape[1] != state["n_features"]:
            raise InputError(f"ComBat: input '{name}' has {array.shape[1]} features; it was fitted with "
                             f"{state['n_features']}")
        rows, values = _present_rows(name, array, subjects)
        unseen = sorted(set(labels[rows]) - set(state["sites"]))
        if unseen:
            raise InputError(f"ComBat: site '{unseen[0]}' (column '{self.site_column}') was not among the sites "
                             f"input '{name}' was fitted on ({', '.join(state['sites'])}); refit with its subjects")
        site_index = np.array([state["sites"].index(s) for s in labels[rows]], dtype=np.int64)
        rows_design = design[rows] if design is not None else np.broadcast_to(
            state["design_mean"], (len(rows), len(state["design_mean"])))
        out = array.astype(np.float32, copy=True)
        features = state["features"]
        out[np.ix_(rows, features)] = _apply_image(values[:, features], site_index, rows_design, state)
        return out

    def to_dict(self) -> dict:
        """JSON-able state (numpy arrays as lists), read back by ``from_dict``."""
        images = {name: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
                  for name, state in self.images.items()}
        return {"format": FORMAT, "version": 1, "options": dict(self.options), "site_column": self.site_column,
                "covariates": [dict(c) for c in self.covariates], "images": images}

    @classmethod
    def from_dict(cls, d: dict) -> "ComBat":
        if d.get("format") != FORMAT:
            raise InputError(f"ComBat: not a stored ComBat (format {d.get('format')!r}, expected '{FORMAT}')")
        return cls(dict(d["options"]), d["site_column"], [dict(c) for c in d["covariates"]],
                   {name: _state_arrays(state) for name, state in d["images"].items()})


def _state_arrays(state: dict) -> dict:
    """One image's stored state with its arrays as numpy again (shapes kept when a dimension is 0)."""
    m, p, k = len(state["features"]), len(state["design_mean"]), len(state["sites"])
    shapes = {"features": (m,), "var_pooled": (m,), "stand_mean": (m,), "beta": (p, m), "design_mean": (p,),
              "gamma": (k, m), "delta": (k, m)}
    out = dict(state)
    for key in _ARRAYS:
        out[key] = np.asarray(state[key], dtype=np.int64 if key == "features" else np.float64).reshape(shapes[key])
    return out
