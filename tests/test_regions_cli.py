"""``inva predict/evaluate --regions``: regions.csv for volume, surface and region-table cohorts, region
metrics in metrics.json, and bad label files refused (exit 2, one line, nothing written)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from inva_pyro import cli
from test_cohort_files import (REGIONS, SHAPE, VERTICES, affine, assert_refused, mask_array, save_nifti,
                               tiny_preset_file, write_gifti, write_region_cohort, write_surface_cohort,
                               write_volume_cohort)

N_TEST = 3


def _fit(root, folder, inputs, outcome="pet", mask=False):
    run = folder / "run"
    args = ["fit", "--manifest", str(root / "manifest.csv"), "--inputs", inputs, "--outcome", outcome,
            "--model", str(tiny_preset_file(folder)), "--device", "cpu", "--out", str(run)]
    assert cli.main(args + (["--mask", str(root / "mask.nii.gz")] if mask else [])) == 0
    return run


def _predict(run, root, out, labels, command="predict"):
    return cli.main([command, "--run", str(run), "--manifest", str(root / "manifest.csv"), "--out", str(out),
                     "--levels", "0.5,0.9", "--regions", str(labels)])


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    folder = tmp_path_factory.mktemp("regions_vol")
    root = write_volume_cohort(folder / "vol")
    return root, _fit(root, folder, "gm,wm", mask=True)


def _volume_labels(path, values=None, aff=None):
    labels = np.zeros(SHAPE)
    labels[1:3, 1:4, 1:3] = 1
    labels[3:5, 1:4, 1:3] = 4
    labels[0] = 9                                          # outside the mask: ignored
    save_nifti(path, labels if values is None else values, aff)
    return path


def _check_table(table: pd.DataFrame, regions: list[str]):
    assert list(table.columns) == ["subject", "region", "mean", "sd", "lo50", "hi50", "lo90", "hi90"]
    assert len(table) == N_TEST * (len(regions) + 1)
    assert list(table["region"].astype(str)[: len(regions) + 1]) == regions + ["all"]
    assert np.all(table["sd"] > 0) and np.all(table["lo90"] <= table["lo50"]) and np.all(table["hi50"] <= table["hi90"])


def test_volume_regions_csv_and_evaluate(volume, tmp_path, capsys):
    root, run = volume
    labels = _volume_labels(tmp_path / "labels.nii.gz")
    assert _predict(run, root, tmp_path / "pred", labels) == 0
    table = pd.read_csv(tmp_path / "pred" / "regions.csv")
    _check_table(table, ["1", "4"])
    # region 'all' is the mean over the mask of the predicted mean map
    mean_map = nib.load(str(tmp_path / "pred" / f"{table['subject'][0]}_pet_mean.nii.gz")).get_fdata()
    assert table["mean"][2] == pytest.approx(mean_map[mask_array()].mean(), rel=1e-5)
    assert table["mean"][0] == pytest.approx(mean_map[1:3, 1:4, 1:3].mean(), rel=1e-5)
    assert _predict(run, root, tmp_path / "eval", labels, "evaluate") == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    regions = metrics["regions"]
    assert set(regions["labels"]["coverage"]) == {"0.5", "0.9"} and regions["labels"]["n_regions"] == 2
    assert 0 <= regions["all"]["coverage"]["0.9"] <= 1 and regions["labels"]["crps"] > 0
    assert metrics["multivariate"]["energy_joint"] > 0 and metrics["multivariate"]["variogram_independent"] > 0
    assert (tmp_path / "eval" / "region_calibration.png").stat().st_size > 0
    assert (tmp_path / "eval" / "ppc_regions.png").stat().st_size > 0


def _other_shape(path):
    save_nifti(path, np.ones((6, 5, 5)))
    return "label image shape (6, 5, 5) differs from the cohort's (6, 5, 4)"


def _other_affine(path):
    aff = affine()
    aff[0, 3] += 2.0
    _volume_labels(path, aff=aff)
    return "label image affine differs from the cohort's"


def _not_integer(path):
    values = np.zeros(SHAPE)
    values[1:5, 1:4, 1:3] = 1.5
    save_nifti(path, values)
    return "region labels must be integers"


def _none_inside(path):
    values = np.zeros(SHAPE)
    values[0] = 3
    save_nifti(path, values)
    return "no region label (non-zero) inside the cohort's mask"


@pytest.mark.parametrize("spoil", [_other_shape, _other_affine, _not_integer, _none_inside])
def test_bad_volume_labels_are_refused(volume, tmp_path, capsys, spoil):
    root, run = volume
    path = tmp_path / "labels.nii.gz"
    expected = spoil(path)
    capsys.readouterr()
    out = tmp_path / "pred"
    assert _predict(run, root, out, path) == 2
    assert_refused(capsys, expected, out)


def test_labels_of_another_cohort_kind_are_refused(volume, tmp_path, capsys):
    root, run = volume
    path = tmp_path / "groups.csv"
    pd.DataFrame({"region": ["a"], "group": ["g"]}).to_csv(path, index=False)
    capsys.readouterr()
    out = tmp_path / "pred"
    assert _predict(run, root, out, path) == 2
    assert_refused(capsys, "--regions on a volume cohort needs a NIfTI label image", out)


def test_surface_regions_from_a_label_gifti_pair(tmp_path, capsys):
    root = write_surface_cohort(tmp_path / "surf")
    run = _fit(root, tmp_path, "thick")
    paths = []
    for hemi, n in VERTICES.items():
        paths.append(tmp_path / f"{hemi}.label.gii")
        write_gifti(paths[-1], (np.arange(n) % 3).astype(np.int32) + (10 if hemi == "rh" else 0))
    assert _predict(run, root, tmp_path / "pred", ",".join(map(str, paths))) == 0
    _check_table(pd.read_csv(tmp_path / "pred" / "regions.csv"), ["1", "2", "10", "11", "12"])
    capsys.readouterr()
    assert _predict(run, root, tmp_path / "bad", paths[0]) == 2      # one hemisphere only
    assert_refused(capsys, "label GIfTI has 14 vertices; the cohort's surface has 25", tmp_path / "bad")


def test_region_table_groups(tmp_path, capsys):
    root = write_region_cohort(tmp_path / "reg")
    run = _fit(root, tmp_path, "thick")
    groups = tmp_path / "groups.csv"
    pd.DataFrame({"region": REGIONS[:4], "lobe": ["temporal", "occipital", "temporal", "temporal"]}).to_csv(
        groups, index=False)
    assert _predict(run, root, tmp_path / "pred", groups) == 0
    table = pd.read_csv(tmp_path / "pred" / "regions.csv")
    _check_table(table, ["occipital", "temporal"])
    pred_table = pd.read_csv(tmp_path / "pred" / f"{table['subject'][0]}_pet_mean.csv")
    assert table["mean"][1] == pytest.approx(pred_table[[REGIONS[0], REGIONS[2], REGIONS[3]]].to_numpy().mean(), rel=1e-5)
    pd.DataFrame({"region": ["lh_nowhere"], "lobe": ["x"]}).to_csv(groups, index=False)
    capsys.readouterr()
    assert _predict(run, root, tmp_path / "bad", groups) == 2
    assert_refused(capsys, "1 region(s) not in the cohort (e.g. 'lh_nowhere')", tmp_path / "bad")
