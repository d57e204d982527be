"""Designs ``surface`` (fsaverage5 per-vertex maps) and ``regions`` (the same per sphere parcel), from nilearn's
shipped meshes (docs/simulation.md).
"""
from __future__ import annotations

import numpy as np

from ..spaces.surface import mesh_edges
from .common import P1_CENTRES, P2_CENTRES, bumps, sigmoid, softplus, subject_factors, subject_rng


def _mesh_smoother(faces: np.ndarray, n_vertices: int):
    """Row-normalised (A + I) of the mesh graph: one step of neighbour averaging."""
    from scipy import sparse

    edges = mesh_edges(faces)
    i, j = np.concatenate([edges[:, 0], edges[:, 1]]), np.concatenate([edges[:, 1], edges[:, 0]])
    adjacency = sparse.coo_matrix((np.ones(i.size), (i, j)), shape=(n_vertices, n_vertices)).tocsr()
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

    def __init__(self, n_subjects: int, seed: int = 0, noise: str = "independent"):
        from nilearn import datasets

        self.n_subjects, self.seed, self.noise = n_subjects, seed, noise
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
                return bumps(sphere, [tuple(sphere[v]) for v in nearest], width)

            self.patterns[hemi] = {"P1": pattern(P1_CENTRES), "P2": pattern(P2_CENTRES)}
            self.smoothers[hemi] = _mesh_smoother(np.asarray(pial.faces), sphere.shape[0])
        self.factors, self.covariates = subject_factors(n_subjects, seed)

    def _fields(self, rngs: list[np.random.Generator], hemi: str) -> np.ndarray:
        """(n, V) unit-sd fields smoothed on ``hemi``'s mesh, one per generator."""
        field = np.stack([rng.standard_normal(self.n_vertices[hemi]) for rng in rngs], axis=1)
        for _ in range(self.smoothing_steps):
            field = self.smoothers[hemi] @ field
        return (field / field.std(axis=0, keepdims=True)).T

    def chunk(self, start: int, stop: int) -> dict[str, dict[str, np.ndarray]]:
        """hemi -> name -> (stop - start, V) float32 for thickness, area, curv, sulc, pet, truth."""
        idx = np.arange(start, stop)
        rngs = [subject_rng(self.seed, int(i)) for i in idx]
        a1, a2, b = (self.factors[k][idx][:, None] for k in ("a1", "a2", "b"))
        out = {}
        for hemi in self.HEMIS:
            tpl, pat = self.templates[hemi], self.patterns[hemi]
            P1, P2 = pat["P1"][None], pat["P2"][None]
            e1, e2, e3, e4 = (self._fields(rngs, hemi) for _ in range(4))
            noise = lambda: np.stack([r.standard_normal(self.n_vertices[hemi]) for r in rngs])  # noqa: E731
            thickness = (tpl["thickness"][None] * np.exp(-0.15 * a1 * P1 - 0.08 * softplus(a2) * P2
                                                         + 0.10 * e1) * (1 + 0.02 * noise()))
            area = tpl["area"][None] * np.exp(0.08 * b + 0.08 * e2)
            curv = tpl["curvature"][None] + 0.03 * e3 + 0.01 * noise()
            sulc = tpl["sulcal"][None] + 0.3 * a1 * P1 + 0.1 * e4
            local = np.tanh(0.5 * thickness)
            mean = 0.4 + 1.2 * local * np.exp(-0.5 * softplus(a2) * P2) + 0.08 * sulc
            sd = (0.015 + 0.025 * local) * (1 + 0.5 * sigmoid(2 * a2) * P2)
            # noise "smooth": the outcome's noise is itself a field smoothed on the mesh (unit sd)
            pet = mean + sd * (self._fields(rngs, hemi) if self.noise == "smooth" else noise())
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
