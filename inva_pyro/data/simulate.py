"""Simulated cohorts with known truth.

Designs: ``paper`` (below, unchanged), and ``volume`` (MNI152 templates), ``surface``
(fsaverage5 maps) and ``regions`` (the surface design per parcel), built from templates that
ship inside the installed nilearn package; their equations are in docs/simulation.md and in the
docstrings of VolumeDesign, SurfaceDesign and RegionDesign.

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

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

PAPER_GRID = (32, 32)
LOADINGS = np.array([[1.0, 0.5], [0.6, -0.8], [0.8, 0.8]])


def _bump(coords: np.ndarray, centre: tuple[float, float], width: float) -> np.ndarray:
    d2 = ((coords - np.asarray(centre)) ** 2).sum(-1)
    return np.exp(-d2 / (2 * width ** 2))


def _smooth_field(rng: np.random.Generator, n: int, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    white = rng.standard_normal((n, *shape))
    smooth = ndimage.gaussian_filter(white, sigma=(0, *([sigma] * len(shape))), mode="wrap")
    return smooth / smooth.reshape(n, -1).std(axis=1).reshape(n, *([1] * len(shape)))


def paper_patterns(grid: tuple[int, int] = PAPER_GRID) -> dict:
    """The ``paper`` design's fixed maps on ``grid``: coordinates, the shared bumps S_j, the specific
    bumps C_k, the input means mu_k and the outcome mean mu_y."""
    axes = [np.linspace(-1, 1, g) for g in grid]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return {"coords": coords,
            "shared": [_bump(coords, (-0.4, 0.3), 0.35), _bump(coords, (0.4, -0.2), 0.4)],
            "specific": [_bump(coords, (0.5, 0.55), 0.3), _bump(coords, (-0.5, -0.5), 0.3),
                         _bump(coords, (0.0, 0.0), 0.3)],
            "base": [1.0 + 0.3 * coords[..., 0], 0.5 - 0.2 * coords[..., 1], 0.3 * coords[..., 0] * coords[..., 1]],
            "mu_y": 1.0 + 0.4 * coords[..., 1]}


def simulate_paper(n_subjects: int, seed: int = 0, grid: tuple[int, int] = PAPER_GRID) -> dict:
    """Arrays of the ``paper`` design: inputs (n, H, W) each, outcome, true mean and sd, covariates."""
    rng = np.random.default_rng(seed)
    patterns = paper_patterns(grid)
    shared, specific, base, mu_y = (patterns[k] for k in ("shared", "specific", "base", "mu_y"))

    age = rng.standard_normal(n_subjects)
    site = rng.integers(0, 2, n_subjects).astype(float)
    a = np.stack([0.8 * age + 0.6 * rng.standard_normal(n_subjects), rng.standard_normal(n_subjects)], axis=1)
    b = rng.standard_normal((3, n_subjects))
    expand = lambda v: v[:, None, None]

    deviations, inputs = [], {}
    for k in range(3):
        dev = (sum(LOADINGS[k, j] * expand(a[:, j]) * shared[j] for j in range(2))
               + expand(b[k]) * specific[k]
               + 0.5 * _smooth_field(rng, n_subjects, grid, 1.5)
               + 0.2 * rng.standard_normal((n_subjects, *grid)))
        deviations.append(dev)
        inputs[f"x{k + 1}"] = base[k] + dev
    d1, d2, d3 = deviations
    mean = (mu_y + 1.0 * np.tanh(1.5 * expand(a[:, 0])) * shared[0] + 0.5 * (expand(a[:, 1]) ** 2 - 1) * shared[1]
            + 0.6 * expand(b[0]) * specific[0] + 0.6 * np.tanh(2 * expand(b[1])) * specific[1]
            + 0.6 * np.tanh(d1) + 0.3 * d1 * d3)
    sd = 0.5 * np.exp(0.25 * d2) * (0.7 + 0.6 * shared[0])
    outcome = mean + sd * rng.standard_normal(mean.shape)
    covariates = pd.DataFrame({"age": 70 + 8 * age, "site": site})
    return {"inputs": inputs, "outcome": outcome, "true_mean": mean, "true_sd": sd, "covariates": covariates}


def default_split(n_subjects: int, seed: int) -> np.ndarray:
    """60% train / 20% val / 20% test, shuffled with the seed."""
    rng = np.random.default_rng(seed + 1)
    labels = np.array(["train"] * n_subjects, dtype=object)
    n_val = n_test = int(round(0.2 * n_subjects))
    order = rng.permutation(n_subjects)
    labels[order[:n_val]] = "val"
    labels[order[n_val:n_val + n_test]] = "test"
    return labels


# ----- shared helpers of the brain designs ------------------------------------------------------
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p, eps: float = 0.01):
    p = np.clip(p, eps, 1 - eps)
    return np.log(p / (1 - p))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _subject_factors(n_subjects: int, seed: int) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Subject factors and covariates shared by the brain designs.

    age_z ~ N(0, 1) drives the atrophy factor a1 = 0.8 age_z + 0.6 u; a2 (pathology load),
    b (white-matter / head-size factor) ~ N(0, 1); site ~ Bernoulli(0.5) is a null covariate.
    """
    rng = np.random.default_rng([seed, 7])
    age_z = rng.standard_normal(n_subjects)
    factors = {"a1": 0.8 * age_z + 0.6 * rng.standard_normal(n_subjects),
               "a2": rng.standard_normal(n_subjects),
               "b": rng.standard_normal(n_subjects)}
    covariates = pd.DataFrame({"age": np.round(70 + 8 * age_z, 2),
                               "site": rng.integers(0, 2, n_subjects).astype(float)})
    return factors, covariates


def _subject_rng(seed: int, i: int) -> np.random.Generator:
    # One stream per subject: a subject's images do not depend on how subjects are chunked.
    return np.random.default_rng([seed, 11, i])


def _bumps(coords: np.ndarray, centres: list[tuple[float, float, float]], width: float) -> np.ndarray:
    """max over centres c of exp(-|x - c|^2 / (2 width^2)): a pattern in [0, 1] (coords in mm)."""
    out = np.zeros(coords.shape[:-1])
    for centre in centres:
        d2 = ((coords - np.asarray(centre, dtype=float)) ** 2).sum(-1)
        out = np.maximum(out, np.exp(-d2 / (2 * width ** 2)))
    return out


def _mirrored(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    return [p for x, y, z in points for p in ((x, y, z), (-x, y, z))]


# MNI coordinates (mm) of the patterns: P1 atrophy (medial and lateral temporal lobe), P2 pathology
# (precuneus / posterior cingulate, medial frontal, lateral parietal), P3 periventricular white matter.
P1_CENTRES = _mirrored([(26, -20, -16), (54, -22, -12)])
P2_CENTRES = _mirrored([(4, -58, 34), (4, 48, 12), (44, -62, 36)])
P3_CENTRES = _mirrored([(20, -12, 26)])


# ----- design "volume": MNI152 templates -----------------------------------------------------------
class VolumeDesign:
    """The ``volume`` design on nilearn's MNI152 (2009a) GM, WM and T1 templates (docs/simulation.md).

    Templates are resampled by nilearn to ``voxel_mm`` (integer mm; 4 gives 50 x 59 x 48). The
    brain mask is (GM + WM template) > 0.5. ``subject(i)`` returns subject i's images, drawn
    from its own random stream, so writing can go subject by subject in bounded memory.
    """

    def __init__(self, n_subjects: int, seed: int = 0, voxel_mm: int = 4):
        from nilearn import datasets

        self.n_subjects, self.seed, self.voxel_mm = n_subjects, seed, int(voxel_mm)
        gm_img = datasets.load_mni152_gm_template(resolution=self.voxel_mm)
        self.affine = gm_img.affine.copy()
        self.header = gm_img.header.copy()
        self.G = np.asarray(gm_img.get_fdata(), dtype=np.float64)
        self.W = np.asarray(datasets.load_mni152_wm_template(resolution=self.voxel_mm).get_fdata())
        t1 = np.asarray(datasets.load_mni152_template(resolution=self.voxel_mm).get_fdata())
        self.T = t1 / t1.max()
        self.shape = self.G.shape
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij"), axis=-1)
        mm = ijk @ self.affine[:3, :3].T + self.affine[:3, 3]
        self.P1 = _bumps(mm, P1_CENTRES, 12.0)
        self.P2 = _bumps(mm, P2_CENTRES, 14.0)
        self.P3 = _bumps(mm, P3_CENTRES, 12.0)
        self.mask = (self.G + self.W) > 0.5
        self._logit_G, self._logit_W = _logit(self.G), _logit(self.W)  # the same for every subject
        # Field smoothness in mm, so that designs at different voxel sizes look alike.
        self.field_sigma = 6.0 / self.voxel_mm
        self.factors, self.covariates = _subject_factors(n_subjects, seed)

    def _field(self, rng: np.random.Generator) -> np.ndarray:
        smooth = ndimage.gaussian_filter(rng.standard_normal(self.shape), self.field_sigma, mode="nearest")
        return smooth / smooth.std()

    def subject(self, i: int) -> dict[str, np.ndarray]:
        """Subject i's images (float32 3D arrays): gm, wm, t1, pet, pet_true_mean, pet_true_sd."""
        rng = _subject_rng(self.seed, i)
        a1, a2, b = (self.factors[k][i] for k in ("a1", "a2", "b"))
        e1, e2, e3 = self._field(rng), self._field(rng), self._field(rng)
        noise = lambda: rng.standard_normal(self.shape)  # noqa: E731
        gm = np.clip(_sigmoid(self._logit_G - 0.8 * a1 * self.P1 - 0.5 * _softplus(a2) * self.P2
                              + 0.35 * e1) + 0.02 * noise(), 0, 1)
        wm = np.clip(_sigmoid(self._logit_W - 0.6 * b * self.P3 - 0.25 * a1 * self.P1
                              + 0.35 * e2) + 0.02 * noise(), 0, 1)
        t1 = self.T + 0.3 * (wm - self.W) - 0.15 * (gm - self.G) + 0.05 * e3 + 0.02 * noise()
        mean = (0.3 + 0.5 * wm + 1.7 * gm ** 1.5 * np.exp(-0.6 * _softplus(a2) * self.P2)
                * (1 - 0.05 * a1))
        sd = (0.04 + 0.10 * gm) * (1 + 0.5 * _sigmoid(2 * a2) * self.P2)
        pet = mean + sd * noise()
        arrays = {"gm": gm, "wm": wm, "t1": t1, "pet": pet, "pet_true_mean": mean, "pet_true_sd": sd}
        # Skull-stripped, as real inputs are: zero outside the brain mask (which also makes the
        # files compress several times better and so write faster).
        return {key: np.where(self.mask, value, 0.0).astype(np.float32) for key, value in arrays.items()}


# ----- design "surface": fsaverage5 maps ------------------------------------------------------------
def _mesh_smoother(faces: np.ndarray, n_vertices: int):
    """Row-normalised (A + I) of the mesh graph: one step of neighbour averaging."""
    from scipy import sparse

    i = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    j = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    adjacency = sparse.coo_matrix((np.ones(i.size), (i, j)), shape=(n_vertices, n_vertices)).tocsr()
    adjacency.data[:] = 1.0  # an edge shared by two faces counts once
    step = adjacency + sparse.identity(n_vertices, format="csr")
    return sparse.diags(1.0 / np.asarray(step.sum(axis=1)).ravel()) @ step


class SurfaceDesign:
    """The ``surface`` design on nilearn's fsaverage5 (10242 vertices per hemisphere).

    Template maps: cortical thickness, vertex area, curvature and sulcal depth. Subject fields
    are white noise smoothed on the mesh (``smoothing_steps`` rounds of neighbour averaging,
    then rescaled to unit sd); patterns are bumps on the sphere around the vertices nearest
    to MNI points on the pial surface. ``chunk(i0, i1)`` returns subjects i0..i1-1.
    """

    HEMIS = ("lh", "rh")
    _NILEARN_HEMI = {"lh": "left", "rh": "right"}
    smoothing_steps = 15

    def __init__(self, n_subjects: int, seed: int = 0):
        from nilearn import datasets

        self.n_subjects, self.seed = n_subjects, seed
        mesh = datasets.load_fsaverage("fsaverage5")
        maps = {key: datasets.load_fsaverage_data(mesh="fsaverage5", data_type=key)
                for key in ("thickness", "area", "curvature", "sulcal")}
        self.templates, self.patterns, self.smoothers, self.n_vertices = {}, {}, {}, {}
        for hemi in self.HEMIS:
            side = self._NILEARN_HEMI[hemi]
            pial = mesh["pial"].parts[side]
            sphere = np.asarray(mesh["sphere"].parts[side].coordinates, dtype=np.float64)
            self.n_vertices[hemi] = sphere.shape[0]
            self.templates[hemi] = {key: np.asarray(img.data.parts[side], dtype=np.float64).ravel()
                                    for key, img in maps.items()}
            sign = -1 if hemi == "lh" else 1
            coords = np.asarray(pial.coordinates, dtype=np.float64)

            def pattern(centres, width=20.0):
                own = [c for c in centres if np.sign(c[0]) == sign]
                nearest = [int(np.argmin(((coords - np.asarray(c)) ** 2).sum(1))) for c in own]
                return _bumps(sphere, [tuple(sphere[v]) for v in nearest], width)

            self.patterns[hemi] = {"P1": pattern(P1_CENTRES), "P2": pattern(P2_CENTRES)}
            self.smoothers[hemi] = _mesh_smoother(np.asarray(pial.faces), sphere.shape[0])
        self.factors, self.covariates = _subject_factors(n_subjects, seed)

    def _fields(self, rngs: list[np.random.Generator], hemi: str) -> np.ndarray:
        """(n, V) unit-sd fields smoothed on ``hemi``'s mesh, one per generator."""
        field = np.stack([rng.standard_normal(self.n_vertices[hemi]) for rng in rngs], axis=1)
        for _ in range(self.smoothing_steps):
            field = self.smoothers[hemi] @ field
        return (field / field.std(axis=0, keepdims=True)).T

    def chunk(self, start: int, stop: int) -> dict[str, dict[str, np.ndarray]]:
        """hemi -> name -> (stop - start, V) float32 for thickness, area, curv, sulc, pet, truth."""
        idx = np.arange(start, stop)
        rngs = [_subject_rng(self.seed, int(i)) for i in idx]
        a1, a2, b = (self.factors[k][idx][:, None] for k in ("a1", "a2", "b"))
        out = {}
        for hemi in self.HEMIS:
            tpl, pat = self.templates[hemi], self.patterns[hemi]
            P1, P2 = pat["P1"][None], pat["P2"][None]
            e1, e2, e3, e4 = (self._fields(rngs, hemi) for _ in range(4))
            noise = lambda: np.stack([r.standard_normal(self.n_vertices[hemi]) for r in rngs])  # noqa: E731
            thickness = (tpl["thickness"][None] * np.exp(-0.15 * a1 * P1 - 0.08 * _softplus(a2) * P2
                                                         + 0.10 * e1) * (1 + 0.02 * noise()))
            area = tpl["area"][None] * np.exp(0.08 * b + 0.08 * e2)
            curv = tpl["curvature"][None] + 0.03 * e3 + 0.01 * noise()
            sulc = tpl["sulcal"][None] + 0.3 * a1 * P1 + 0.1 * e4
            local = np.tanh(0.5 * thickness)
            mean = 0.4 + 1.2 * local * np.exp(-0.5 * _softplus(a2) * P2) + 0.08 * sulc
            sd = (0.015 + 0.025 * local) * (1 + 0.5 * _sigmoid(2 * a2) * P2)
            pet = mean + sd * noise()
            out[hemi] = {key: value.astype(np.float32) for key, value in
                         {"thickness": thickness, "area": area, "curv": curv, "sulc": sulc, "pet": pet,
                          "pet_true_mean": mean, "pet_true_sd": sd}.items()}
        return out


# ----- design "regions": the surface design averaged over parcels -------------------------------------
def sphere_parcels(sphere: np.ndarray, n_parcels: int) -> np.ndarray:
    """Vertex -> parcel (0..n_parcels-1): Voronoi cells on the sphere of seeds chosen by
    farthest-point sampling from vertex 0 (deterministic, roughly equal-sized parcels)."""
    seeds = [0]
    distance = ((sphere - sphere[0]) ** 2).sum(1)
    for _ in range(n_parcels - 1):
        seeds.append(int(np.argmax(distance)))
        distance = np.minimum(distance, ((sphere - sphere[seeds[-1]]) ** 2).sum(1))
    d2 = ((sphere[:, None, :] - sphere[None, seeds, :]) ** 2).sum(-1)
    return np.argmin(d2, axis=1)


class RegionDesign:
    """The ``regions`` design: the surface design summarised over 34 parcels per hemisphere,
    as FreeSurfer's aparcstats2table would (thickness, curvature, sulcal depth: parcel means;
    area: parcel sum). The outcome's noise is drawn at the region level:
    y_r = mean_r(m) + mean_r(s) eta_r, so the true region mean and sd are mean_r(m), mean_r(s).
    """

    N_PARCELS = 34

    def __init__(self, n_subjects: int, seed: int = 0):
        from nilearn import datasets

        self.surface = SurfaceDesign(n_subjects, seed)
        mesh = datasets.load_fsaverage("fsaverage5")
        self.parcels = {}
        for hemi in SurfaceDesign.HEMIS:
            sphere = np.asarray(mesh["sphere"].parts[SurfaceDesign._NILEARN_HEMI[hemi]].coordinates)
            self.parcels[hemi] = sphere_parcels(sphere / 100.0, self.N_PARCELS)
        self.regions = [f"{hemi}_r{k + 1:02d}" for hemi in SurfaceDesign.HEMIS for k in range(self.N_PARCELS)]
        self.covariates = self.surface.covariates
        self.seed = seed

    def chunk(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """name -> (stop - start, 68) region values."""
        vertex = self.surface.chunk(start, stop)
        out = {}
        for name in ("thickness", "area", "curv", "sulc", "pet_true_mean", "pet_true_sd"):
            parts = []
            for hemi in SurfaceDesign.HEMIS:
                labels = self.parcels[hemi]
                counts = np.bincount(labels, minlength=self.N_PARCELS)
                sums = np.stack([np.bincount(labels, weights=row, minlength=self.N_PARCELS)
                                 for row in vertex[hemi][name].astype(np.float64)])
                parts.append(sums if name == "area" else sums / counts)
            out[name] = np.concatenate(parts, axis=1)
        rng = np.random.default_rng([self.seed, 13, start])
        out["pet"] = out["pet_true_mean"] + out["pet_true_sd"] * rng.standard_normal(out["pet_true_mean"].shape)
        return out


DESIGNS = ("paper", "volume", "surface", "regions")
VOLUME_VOXEL_MM = 4
_CHUNK = 50  # subjects generated at once by the surface and region designs
_TRUTH = {"mean": "pet_true_mean", "sd": "pet_true_sd"}


def write_cohort(out: Path, design: str, n_subjects: int, seed: int, *, voxel_mm: int | None = None) -> Path:
    """Simulate ``design`` and write it as a cohort folder (CONTRACT.md): images, manifest, truth.

    ``voxel_mm`` sets the voxel size of the ``volume`` design (integer mm, default 4).
    """
    from .io import atomic_dir

    if design not in DESIGNS:
        from ..errors import InputError
        raise InputError(f"--design {design}: unknown design (known: {', '.join(DESIGNS)})")
    writers = {"paper": _write_paper, "volume": _write_volume, "surface": _write_surface,
               "regions": _write_regions}
    with atomic_dir(Path(out)) as tmp:
        (tmp / "images").mkdir()
        split = default_split(n_subjects, seed)
        subjects = [f"sub-{i + 1:04d}" for i in range(n_subjects)]
        options = {"voxel_mm": voxel_mm or VOLUME_VOXEL_MM} if design == "volume" else {}
        rows, spec, covariates = writers[design](tmp, subjects, seed, **options)
        for row, subject, label in zip(rows, subjects, split):
            row.update({"subject": subject, "split": label})
        manifest = pd.DataFrame(rows)
        front = ["subject", "split"]
        manifest = manifest[front + [c for c in manifest.columns if c not in front]]
        manifest = pd.concat([manifest, covariates.reset_index(drop=True)], axis=1)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        cohort = {"design": design, **spec, "covariates": list(covariates.columns), "seed": seed,
                  "n_subjects": n_subjects, **options}
        (tmp / "cohort.json").write_text(json.dumps(cohort, indent=2))
    return Path(out)


def _write_paper(tmp: Path, subjects: list[str], seed: int):
    import nibabel as nib

    sim = simulate_paper(len(subjects), seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 2 mm pixels; the grid is one slice thick
    arrays = {**sim["inputs"], "y": sim["outcome"], "y_true_mean": sim["true_mean"], "y_true_sd": sim["true_sd"]}
    rows = []
    for i, subject in enumerate(subjects):
        row = {}
        for col, values in arrays.items():
            rel = f"images/{subject}_{col}.nii.gz"
            nib.save(nib.Nifti1Image(values[i][..., None].astype(np.float32), affine), tmp / rel)
            row[col] = rel
        rows.append(row)
    spec = {"inputs": list(sim["inputs"]), "outcome": "y", "mask": None,
            "truth": {"mean": "y_true_mean", "sd": "y_true_sd"}}
    return rows, spec, sim["covariates"]


def _write_volume(tmp: Path, subjects: list[str], seed: int, voxel_mm: int):
    from .io import save_nifti

    design = VolumeDesign(len(subjects), seed, voxel_mm)
    header = design.header.copy()
    header.set_xyzt_units("mm")
    # fsync=False: the files are inside a fresh atomic_dir, which appears only when complete.
    save_nifti(design.mask.astype(np.float32), design.affine, header, tmp / "mask.nii.gz", fsync=False)
    rows = []
    for i, subject in enumerate(subjects):
        row = {}
        for col, values in design.subject(i).items():
            rel = f"images/{subject}_{col}.nii.gz"
            save_nifti(values, design.affine, header, tmp / rel, fsync=False)
            row[col] = rel
        rows.append(row)
    spec = {"inputs": ["gm", "wm", "t1"], "outcome": "pet", "mask": "mask.nii.gz", "truth": _TRUTH}
    return rows, spec, design.covariates


def _write_surface(tmp: Path, subjects: list[str], seed: int):
    from .io import save_gifti_map
    from .spaces import HEMISPHERES

    design = SurfaceDesign(len(subjects), seed)
    rows = [{} for _ in subjects]
    for start in range(0, len(subjects), _CHUNK):
        chunk = design.chunk(start, min(start + _CHUNK, len(subjects)))
        for hemi, maps in chunk.items():
            for name, values in maps.items():
                for k, vector in enumerate(values):
                    subject = subjects[start + k]
                    rel = f"images/{subject}_{name}_{hemi}.gii"
                    save_gifti_map(vector, tmp / rel, HEMISPHERES[hemi], fsync=False)
                    rows[start + k][f"{name}_{hemi}"] = rel
    spec = {"inputs": ["thickness", "area", "curv", "sulc"], "outcome": "pet", "mask": None, "truth": _TRUTH,
            "mesh": "fsaverage5"}
    return rows, spec, design.covariates


def _write_regions(tmp: Path, subjects: list[str], seed: int):
    design = RegionDesign(len(subjects), seed)
    tables: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(subjects), _CHUNK):
        for name, values in design.chunk(start, min(start + _CHUNK, len(subjects))).items():
            tables.setdefault(name, []).append(values)
    (tmp / "tables").mkdir()
    rows = [{} for _ in subjects]
    for name, parts in tables.items():
        # One table per measure, rows = subjects, as aparcstats2table writes; every subject's
        # manifest cell points at it.
        frame = pd.DataFrame(np.concatenate(parts).astype(np.float32), columns=design.regions)
        frame.insert(0, "subject", subjects)
        rel = f"tables/{name}.csv"
        frame.to_csv(tmp / rel, index=False, float_format="%.9g")
        for row in rows:
            row[name] = rel
    spec = {"inputs": ["thickness", "area", "curv", "sulc"], "outcome": "pet", "mask": None, "truth": _TRUTH}
    return rows, spec, design.covariates
