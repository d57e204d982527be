"""Design ``volume``: nilearn's MNI152 templates at an integer voxel size (docs/simulation.md).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .common import (NOISE_KINDS, P1_CENTRES, P2_CENTRES, P3_CENTRES, bumps, logit, sigmoid, softplus, subject_factors,
                     smooth_noise, subject_rng)


# ----- design "volume": MNI152 templates -----------------------------------------------------------
class VolumeDesign:
    """The ``volume`` design on nilearn's MNI152 (2009a) GM, WM and T1 templates (docs/simulation.md).

    Templates are resampled by nilearn to ``voxel_mm`` (integer mm; 4 gives 50 x 59 x 48). The
    brain mask is (GM + WM template) > 0.5. ``subject(i)`` returns subject i's images, drawn
    from its own random stream, so writing can go subject by subject in bounded memory.
    """

    NOISE_SIGMA_MM = 4.0  # the Gaussian PSF of ``noise="smooth"`` (FWHM 9.4 mm, as a PET scanner's)

    def __init__(self, n_subjects: int, seed: int = 0, voxel_mm: int = 4, noise: str = "independent"):
        from nilearn import datasets

        self.n_subjects, self.seed, self.voxel_mm = n_subjects, seed, int(voxel_mm)
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
        self.noise = noise
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
        self.P1 = bumps(mm, P1_CENTRES, 12.0)
        self.P2 = bumps(mm, P2_CENTRES, 14.0)
        self.P3 = bumps(mm, P3_CENTRES, 12.0)
        self.mask = (self.G + self.W) > 0.5
        self._logit_G, self._logit_W = logit(self.G), logit(self.W)  # the same for every subject
        # Field smoothness in mm, so that designs at different voxel sizes look alike.
        self.field_sigma = 6.0 / self.voxel_mm
        self.factors, self.covariates = subject_factors(n_subjects, seed)

    def _field(self, rng: np.random.Generator) -> np.ndarray:
        smooth = ndimage.gaussian_filter(rng.standard_normal(self.shape), self.field_sigma, mode="nearest")
        return smooth / smooth.std()

    def subject(self, i: int) -> dict[str, np.ndarray]:
        """Subject i's images (float32 3D arrays): gm, wm, t1, pet, pet_true_mean, pet_true_sd."""
        rng = subject_rng(self.seed, i)
        a1, a2, b = (self.factors[k][i] for k in ("a1", "a2", "b"))
        e1, e2, e3 = self._field(rng), self._field(rng), self._field(rng)
        noise = lambda: rng.standard_normal(self.shape)  # noqa: E731
        gm = np.clip(sigmoid(self._logit_G - 0.8 * a1 * self.P1 - 0.5 * softplus(a2) * self.P2
                              + 0.35 * e1) + 0.02 * noise(), 0, 1)
        wm = np.clip(sigmoid(self._logit_W - 0.6 * b * self.P3 - 0.25 * a1 * self.P1
                              + 0.35 * e2) + 0.02 * noise(), 0, 1)
        t1 = self.T + 0.3 * (wm - self.W) - 0.15 * (gm - self.G) + 0.05 * e3 + 0.02 * noise()
        mean = (0.3 + 0.5 * wm + 1.7 * gm ** 1.5 * np.exp(-0.6 * softplus(a2) * self.P2)
                * (1 - 0.05 * a1))
        sd = (0.04 + 0.10 * gm) * (1 + 0.5 * sigmoid(2 * a2) * self.P2)
        eta = (smooth_noise(rng, 1, self.shape, self.NOISE_SIGMA_MM / self.voxel_mm, mode="nearest")[0]
               if self.noise == "smooth" else noise())
        pet = mean + sd * eta
        arrays = {"gm": gm, "wm": wm, "t1": t1, "pet": pet, "pet_true_mean": mean, "pet_true_sd": sd}
        # Skull-stripped, as real inputs are: zero outside the brain mask (which also makes the
        # files compress several times better and so write faster).
        return {key: np.where(self.mask, value, 0.0).astype(np.float32) for key, value in arrays.items()}


# ----- design "surface": fsaverage5 maps ------------------------------------------------------------
