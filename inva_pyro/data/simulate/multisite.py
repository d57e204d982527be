"""Design ``multisite``: the ``paper`` design measured at several sites, with covariates that act on the
outcome beyond what the images show (equations in the MultisiteDesign docstring and docs/simulation.md).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from .common import NOISE_KINDS, default_split, smooth_noise, subject_rng
from .paper import FIELD_SD, FIELD_SIGMA, LOADINGS, NOISE_SIGMA, PAPER_GRID, WHITE_SD, paper_patterns, subject_terms

DEFAULT_SITES = 3
# Per site: input offsets o ~ N(0, 0.5^2) and gains log g ~ N(0, 0.25^2) (per input), the bias field's
# coefficients u ~ N(0, 1) times BIAS_SCALE, the outcome's offset a ~ N(0, 0.5^2) and gain log b ~ N(0, 0.2^2).
INPUT_OFFSET_SD, INPUT_LOG_GAIN_SD, BIAS_SCALE = 0.5, 0.25, 0.3
OUTCOME_OFFSET_SD, OUTCOME_LOG_GAIN_SD = 0.5, 0.2
SHARE_CONCENTRATION = 4.0   # site shares ~ Dirichlet(4, ..., 4) over the K + 1 sites
AGE_MEAN, AGE_SD, AGE_RANGE = 72.0, 7.0, (55.0, 90.0)
APOE4_PROBS = (0.55, 0.35, 0.10)   # 0, 1, 2 copies
# Covariate effects on the outcome's mean (before the site's outcome calibration): maps A, Z, P times
AGE_EFFECT, SEX_EFFECT, APOE4_EFFECT = 0.9, 0.6, 0.6


def site_names(sites: int) -> list[str]:
    """``S1`` ... ``SK`` (training sites) and ``S{K+1}`` (the held-out site)."""
    return [f"S{s + 1}" for s in range(sites + 1)]


def site_parameters(sites: int, seed: int) -> dict[str, dict]:
    """Per site (``site_names``): input offsets and gains (x1, x2, x3), bias-field coefficients, outcome
    offset and gain, and the site's share of subjects. Site s's parameters come from its own stream:
    they do not depend on K (the shares do)."""
    shares = np.random.default_rng([seed, 30, sites]).dirichlet(np.full(sites + 1, SHARE_CONCENTRATION))
    out = {}
    for s, name in enumerate(site_names(sites)):
        rng = np.random.default_rng([seed, 29, s])
        out[name] = {"input_offset": (INPUT_OFFSET_SD * rng.standard_normal(3)).tolist(),
                     "input_gain": np.exp(INPUT_LOG_GAIN_SD * rng.standard_normal(3)).tolist(),
                     "bias": rng.standard_normal(3).tolist(),
                     "outcome_offset": float(OUTCOME_OFFSET_SD * rng.standard_normal()),
                     "outcome_gain": float(np.exp(OUTCOME_LOG_GAIN_SD * rng.standard_normal())),
                     "share": float(shares[s])}
    return out


def _bump(coords: np.ndarray, centre: tuple[float, float], width: float) -> np.ndarray:
    return np.exp(-((coords - np.asarray(centre)) ** 2).sum(-1) / (2 * width ** 2))


def multisite_maps(grid: tuple[int, int] = PAPER_GRID) -> dict[str, np.ndarray]:
    """The covariates' maps (A: age, Z: sex, P: APOE4) and the bias-field basis (3, H, W): v_1, v_2 and
    v_1^2 + v_2^2 minus its grid mean, each averaging zero over the grid."""
    coords = paper_patterns(grid)["coords"]
    radius = (coords ** 2).sum(-1)
    return {"age": _bump(coords, (-0.5, 0.55), 0.45), "sex": _bump(coords, (0.55, -0.6), 0.45),
            "apoe4": _bump(coords, (0.1, -0.05), 0.35),
            "bias": np.stack([coords[..., 0], coords[..., 1], radius - radius.mean()])}


def _unit_field(rng: np.random.Generator, grid: tuple[int, int]) -> np.ndarray:
    # The paper design's smooth field: white noise smoothed by FIELD_SIGMA pixels, unit sd over the grid.
    field = ndimage.gaussian_filter(rng.standard_normal(grid), FIELD_SIGMA, mode="wrap")
    return field / field.std()


class MultisiteDesign:
    """K training sites and one held-out site measuring the ``paper`` design (32 x 32 grid, inputs
    x1, x2, x3, outcome y), with covariates age, sex and APOE4 that act on the outcome only.

    Sites: S1..SK train, S{K+1} is held out (every subject of it is a test subject). Shares
    w ~ Dirichlet(4, ..., 4) over the K + 1 sites; subject i belongs to site s with probability w_s
    (subjects after ``n_labeled``, MRI-only training subjects, come from the training sites only, with
    the shares renormalised). Per site s (``site_parameters``), every site from the same laws:
    o_sk ~ N(0, 0.5^2), log g_sk ~ N(0, 0.25^2) for inputs k = 1, 2, 3; u_s ~ N(0, I_3);
    a_s ~ N(0, 0.5^2); log b_s ~ N(0, 0.2^2).

    Per subject i of site s (its own random stream, as ``common.subject_rng``): age_i = clip(72 + 7 z_i,
    55, 90) rounded to 0.1 year; sex_i F or M with probability 1/2 (f_i = +1/2 for F, -1/2 for M);
    apoe4_i = 0, 1, 2 copies with probabilities 0.55, 0.35, 0.10; covariates independent of site and of
    the paper design's factors. age_z_i = (age_i - 72) / 7. The paper design's x_ki, m_i, s_i, drawn
    as in ``paper`` except that a_i1 ~ N(0, 1) does not depend on age. Then

        beta_s(v)    = 0.3 (u_s1 v_1 + u_s2 v_2 + u_s3 (|v|^2 - mean_v |v|^2))
        xobs_ki(v)   = o_sk + g_sk (x_ki(v) + beta_s(v))
        c_i(v)       = 0.9 age_z_i A(v) + 0.6 f_i Z(v) + 0.6 apoe4_i P(v)
        mean_i(v)    = a_s + b_s (m_i(v) + c_i(v)),      sd_i(v) = b_s s_i(v)
        y_i(v)       = mean_i(v) + sd_i(v) eta_i(v)

    with A = bump((-0.5, 0.55), 0.45), Z = bump((0.55, -0.6), 0.45), P = bump((0.1, -0.05), 0.35).
    """

    def __init__(self, n_subjects: int, seed: int = 0, sites: int = DEFAULT_SITES, noise: str = "independent",
                 n_labeled: int | None = None, grid: tuple[int, int] = PAPER_GRID):
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
        if sites < 1:
            raise ValueError(f"sites must be at least 1, got {sites}")
        self.n_subjects, self.seed, self.sites, self.noise, self.grid = n_subjects, seed, sites, noise, tuple(grid)
        self.n_labeled = n_subjects if n_labeled is None else n_labeled
        self.names = site_names(sites)
        self.held_out_site = self.names[-1]
        self.parameters = site_parameters(sites, seed)
        self.patterns, self.maps = paper_patterns(self.grid), multisite_maps(self.grid)
        draws = [self._covariates(subject_rng(seed, i), i) for i in range(n_subjects)]
        self.covariates = pd.DataFrame([d for d in draws])
        self.covariates["apoe4"] = self.covariates["apoe4"].astype("Int64")

    def _covariates(self, rng: np.random.Generator, i: int) -> dict:
        """The first draws of subject i's stream: its site, age, sex and APOE4."""
        shares = np.array([self.parameters[name]["share"] for name in self.names])
        if i >= self.n_labeled:   # MRI-only training subjects: training sites only
            shares[-1] = 0.0
        cumulative = np.cumsum(shares / shares.sum())
        site = self.names[min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(self.names) - 1)]
        age = round(float(np.clip(AGE_MEAN + AGE_SD * rng.standard_normal(), *AGE_RANGE)), 1)
        sex = "F" if rng.random() < 0.5 else "M"
        apoe4 = int(rng.choice(3, p=APOE4_PROBS))
        return {"age": age, "sex": sex, "apoe4": apoe4, "site": site}

    def split(self) -> np.ndarray:
        """Training sites' subjects 60/20/20 train/val/test (``default_split`` over them, in id order);
        every held-out-site subject ``test``; MRI-only subjects (after ``n_labeled``) ``train``."""
        labels = np.array(["train"] * self.n_subjects, dtype=object)
        labeled = np.arange(self.n_subjects) < self.n_labeled
        held_out = labeled & (self.covariates["site"].to_numpy() == self.held_out_site)
        training = np.flatnonzero(labeled & ~held_out)
        labels[training] = default_split(len(training), self.seed)
        labels[held_out] = "test"
        return labels

    def covariate_effect(self, i: int) -> np.ndarray:
        """c_i(v): the covariates' part of subject i's mean, before the site's outcome calibration."""
        row = self.covariates.iloc[i]
        age_z = (row["age"] - AGE_MEAN) / AGE_SD
        sex = 0.5 if row["sex"] == "F" else -0.5
        return (AGE_EFFECT * age_z * self.maps["age"] + SEX_EFFECT * sex * self.maps["sex"]
                + APOE4_EFFECT * int(row["apoe4"]) * self.maps["apoe4"])

    def _paper_subject(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One subject of the paper design (x_k, m, s, eta) from its stream; a_1 independent of age."""
        p = self.patterns
        a, b = rng.standard_normal(2), rng.standard_normal(3)
        deviations = [sum(LOADINGS[k, j] * a[j] * p["shared"][j] for j in range(2)) + b[k] * p["specific"][k]
                      + FIELD_SD * _unit_field(rng, self.grid) + WHITE_SD * rng.standard_normal(self.grid)
                      for k in range(3)]
        d1, d2, d3 = deviations
        terms = subject_terms(np.concatenate([a, b]))
        mean = p["mu_y"] + sum(terms[t] * pattern for t, pattern in enumerate(p["terms"]))
        mean = mean + 0.6 * np.tanh(d1) + 0.3 * d1 * d3
        sd = 0.5 * np.exp(0.25 * d2) * (0.7 + 0.6 * p["shared"][0])
        if self.noise == "smooth":
            eta = smooth_noise(rng, 1, self.grid, NOISE_SIGMA)[0]
        else:
            eta = rng.standard_normal(self.grid)
        return {"x": [p["base"][k] + deviations[k] for k in range(3)], "m": mean, "s": sd, "eta": eta}

    def subject(self, i: int, extras: bool = False) -> dict[str, np.ndarray]:
        """Subject i's images: x1, x2, x3 (as the site measures them), y, y_true_mean, y_true_sd. With
        ``extras``, also the site-free quantities: x1_site_free..x3_site_free (x_ki), paper_mean (m_i),
        paper_sd (s_i) and covariate_effect (c_i)."""
        rng = subject_rng(self.seed, i)
        self._covariates(rng, i)   # the stream's first draws: the covariates (kept in self.covariates)
        site = self.parameters[self.covariates.at[i, "site"]]
        paper = self._paper_subject(rng)
        bias = BIAS_SCALE * np.tensordot(site["bias"], self.maps["bias"], axes=1)
        images = {f"x{k + 1}": site["input_offset"][k] + site["input_gain"][k] * (paper["x"][k] + bias)
                  for k in range(3)}
        effect = self.covariate_effect(i)
        mean = site["outcome_offset"] + site["outcome_gain"] * (paper["m"] + effect)
        sd = site["outcome_gain"] * paper["s"]
        images.update({"y": mean + sd * paper["eta"], "y_true_mean": mean, "y_true_sd": sd})
        if extras:
            images.update({f"x{k + 1}_site_free": paper["x"][k] for k in range(3)})
            images.update({"paper_mean": paper["m"], "paper_sd": paper["s"], "covariate_effect": effect})
        return images
