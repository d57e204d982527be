"""Simulated cohorts with known truth.

Designs: ``paper`` (below, unchanged), and ``volume`` (MNI152 templates), ``surface``
(fsaverage5 maps) and ``regions`` (the surface design per parcel), built from templates that
ship inside the installed nilearn package; their equations are in docs/simulation.md and in the
docstrings of VolumeDesign, SurfaceDesign and RegionDesign. ``multisite``: the paper design measured
at K training sites and one held-out site (per-site input and outcome calibration, an input bias
field) with covariates age, sex and APOE4 that act on the outcome only (MultisiteDesign's docstring).

Design ``paper`` (2-D, K = 3 inputs on a 32 x 32 grid, saved as 32 x 32 x 1 NIfTI images).
Grid points v with coordinates in [-1, 1]^2; bump(c, w)(v) = exp(-|v - c|^2 / (2 w^2)).
Per subject i: shared factors a_i ~ N(0, I_2), modality-specific factors b_ki ~ N(0, 1),
a smooth Gaussian random field e_ki (white noise smoothed with a Gaussian kernel of 1.5 px,
rescaled to unit variance) and white noise eps_ki ~ N(0, 1):

    x_ki(v) = mu_k(v) + sum_j L_kj a_ij S_j(v) + b_ki C_k(v) + 0.5 e_ki(v) + 0.2 eps_ki(v)

with S_1, S_2 shared bumps, C_k a bump specific to modality k, mu_k a smooth gradient and loadings
L = [[1.0, 0.5], [0.6, -0.8], [0.8, 0.8]]. The outcome depends nonlinearly on the shared factors,
on the specific factors and on local input values, with heteroscedastic noise:

    m_i(v) = mu_y(v) + 1.0 tanh(1.5 a_i1) S_1(v) + 0.5 (a_i2^2 - 1) S_2(v)
             + 0.6 b_1i C_1(v) + 0.6 tanh(2 b_2i) C_2(v)
             + 0.6 tanh(d_1i(v)) + 0.3 d_1i(v) d_3i(v)
    s_i(v) = 0.5 exp(0.25 d_2i(v)) (0.7 + 0.6 S_1(v))
    y_i(v) = m_i(v) + s_i(v) eta_i(v),     eta ~ N(0, 1)

where d_ki(v) = x_ki(v) - mu_k(v) is the local deviation of input k. The true mean m and sd s are
saved beside every outcome image. A covariate ``age`` drives a_1 (a_i1 = 0.8 age_z + 0.6 u_i) and
``site`` is a null covariate, independent of everything.
"""
from __future__ import annotations

from .common import default_split
from .multisite import MultisiteDesign, site_parameters
from .paper import LOADINGS, PAPER_GRID, paper_patterns, simulate_paper
from .surface import RegionDesign, SurfaceDesign, sphere_parcels
from .volume import VolumeDesign
from .write import DESIGNS, VOLUME_VOXEL_MM, write_cohort

__all__ = ["DESIGNS", "LOADINGS", "PAPER_GRID", "VOLUME_VOXEL_MM", "MultisiteDesign", "RegionDesign", "SurfaceDesign",
           "VolumeDesign", "default_split", "paper_patterns", "simulate_paper", "site_parameters", "sphere_parcels",
           "write_cohort"]
