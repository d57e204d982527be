"""Writes tests/data/legacy_run/: a tiny NIfTI cohort, a run folder and its predictions.

Run once with the code of an earlier release (commit 09ca846, before the subpackage layout) so that
tests/test_layout.py can check that run folders written before a change still load and predict the same:

    PYTHONPATH=/path/to/old/checkout python tests/data/make_legacy_run.py tests/data/legacy_run
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

PRESET = """name = "legacy-tiny"
[model]
family = "inva"
shallow_dim = 3
deep_dim = 2
hidden = 12
shared_hidden = 6
predictor_hidden = 6
local_hidden = 6
local_channels = 2
voxel_embedding = 2
context_dim = 3
[training]
epochs = 3
batch_size = 8
patience = 100
[prediction]
num_samples = 50
"""


def main(out: Path) -> None:
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=False)
    cohort = out / "cohort"
    (cohort / "images").mkdir(parents=True)
    shape, affine = (5, 4, 3), np.diag([3.0, 3.0, 3.0, 1.0])
    mask = np.zeros(shape, np.uint8)
    mask[1:4, 1:3, :] = 1
    nib.save(nib.Nifti1Image(mask, affine), cohort / "mask.nii.gz")
    rows = []
    for i in range(30):
        subj = f"sub-{i:02d}"
        gm, wm = rng.standard_normal(shape), rng.standard_normal(shape)
        pet = 1.0 + 0.8 * gm - 0.3 * wm + 0.3 * rng.standard_normal(shape)
        row = {"subject": subj, "split": "train" if i < 18 else "val" if i < 26 else "test"}
        for name, img in (("gm", gm), ("wm", wm), ("pet", pet)):
            nib.save(nib.Nifti1Image(img.astype(np.float32), affine), cohort / "images" / f"{subj}_{name}.nii.gz")
            row[name] = f"images/{subj}_{name}.nii.gz"
        rows.append(row)
    pd.DataFrame(rows).to_csv(cohort / "manifest.csv", index=False)
    (out / "preset.toml").write_text(PRESET)
    inva = [sys.executable, "-m", "inva_pyro.cli"]
    subprocess.run([*inva, "fit", "--manifest", str(cohort / "manifest.csv"), "--inputs", "gm,wm", "--outcome", "pet",
                    "--mask", str(cohort / "mask.nii.gz"), "--model", str(out / "preset.toml"), "--seed", "1",
                    "--device", "cpu", "--out", str(out / "run")], check=True)
    subprocess.run([*inva, "predict", "--run", str(out / "run"), "--manifest", str(cohort / "manifest.csv"),
                    "--samples", "50", "--seed", "2", "--out", str(out / "predictions")], check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
