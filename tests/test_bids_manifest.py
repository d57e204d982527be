"""`inva manifest`: a manifest CSV from a BIDS tree (raw + derivatives) made here, and its errors."""
import json
from pathlib import Path

import pandas as pd
import pytest

from inva_pyro import cli

SPACE = "space-MNI152NLin2009cAsym"
GM = f"gm={SPACE},label-GM,suffix-probseg"
PET = f"pet={SPACE},desc-suvr,suffix-pet"


def _touch(root: Path, relative: str, text: str = "") -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture(scope="module")
def bids_root(tmp_path_factory) -> Path:
    """sub-01 (no sessions), sub-02 (sessions 1 and 2, session-less anatomy), sub-03 lacking PET."""
    root = tmp_path_factory.mktemp("bids") / "ds"
    _touch(root, "dataset_description.json", json.dumps({"Name": "test", "BIDSVersion": "1.8.0"}))
    _touch(root, "participants.tsv", "participant_id\tage\tsex\nsub-01\t70\tF\nsub-02\t65\tM\nsub-03\tn/a\tF\n")
    for raw in ("sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
                "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nii.gz"):
        _touch(root, raw)
    prep = "derivatives/prep/"
    _touch(root, prep + "dataset_description.json", json.dumps(
        {"Name": "prep", "BIDSVersion": "1.8.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "prep"}]}))
    for sub in ("sub-01", "sub-02", "sub-03"):
        _touch(root, f"{prep}{sub}/anat/{sub}_{SPACE}_label-GM_probseg.nii.gz")
        _touch(root, f"{prep}{sub}/anat/{sub}_{SPACE}_label-GM_probseg.json", "{}")  # sidecar: not an image
        _touch(root, f"{prep}{sub}/anat/{sub}_{SPACE}_label-WM_probseg.nii.gz")
    _touch(root, f"{prep}sub-01/pet/sub-01_{SPACE}_desc-suvr_pet.nii.gz")
    for ses in ("1", "2"):
        _touch(root, f"{prep}sub-02/ses-{ses}/pet/sub-02_ses-{ses}_{SPACE}_desc-suvr_pet.nii.gz")
    return root


def _run(args: list[str]) -> int:
    return cli.main(["manifest", *args])


def test_manifest_rows_sessions_covariates_and_missing(bids_root, tmp_path, capsys):
    out = tmp_path / "manifest.csv"
    assert _run(["--bids", str(bids_root), "--image", GM, "--image", PET, "--out", str(out)]) == 0
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(table.columns) == ["subject", "bids_subject", "session", "gm", "pet", "age", "sex"]
    assert list(table["subject"]) == ["sub-01", "sub-02_ses-1", "sub-02_ses-2", "sub-03"]
    assert list(table["bids_subject"]) == ["sub-01", "sub-02", "sub-02", "sub-03"]
    assert list(table["session"]) == ["", "1", "2", ""]
    prep = bids_root / "derivatives" / "prep"
    # the session-less anatomy of sub-02 serves both sessions; each session has its own PET
    assert table["gm"].tolist() == [str(prep / f"sub-0{i}/anat/sub-0{i}_{SPACE}_label-GM_probseg.nii.gz")
                                    for i in (1, 2, 2, 3)]
    assert table.loc[2, "pet"] == str(prep / f"sub-02/ses-2/pet/sub-02_ses-2_{SPACE}_desc-suvr_pet.nii.gz")
    assert table.loc[3, "pet"] == ""
    assert table["age"].tolist() == ["70", "65", "65", ""] and table["sex"].tolist() == ["F", "M", "M", "F"]
    printed = capsys.readouterr().out
    assert "wrote 4 rows" in printed and "pet: missing for 1 of 4 rows (sub-03)" in printed


def test_manifest_paths_relative_inside_the_csv_folder(bids_root):
    out = bids_root / "derivatives" / "manifest.csv"
    try:
        assert _run(["--bids", str(bids_root), "--image", GM, "--out", str(out)]) == 0
        table = pd.read_csv(out, dtype=str)
        assert table.loc[0, "gm"] == f"prep/sub-01/anat/sub-01_{SPACE}_label-GM_probseg.nii.gz"
    finally:
        out.unlink(missing_ok=True)


@pytest.mark.parametrize("image, problem", [
    (f"gm={SPACE},tissue-GM,suffix-probseg", "unknown BIDS entity 'tissue'"),
    (f"gm={SPACE},suffix-probseg", "matches 2 files of sub-01"),
    (f"gm={SPACE},desc-nothing,suffix-probseg", "matches no file"),
    ("gm=space", "'space' is not an entity of the form key-value"),
    ("subject=suffix-pet", "reserved manifest column"),
])
def test_bad_image_specs_end_with_one_line(bids_root, tmp_path, capsys, image, problem):
    out = tmp_path / "manifest.csv"
    assert _run(["--bids", str(bids_root), "--image", image, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inva: error: ") and err.count("\n") == 1 and problem in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_folder_that_is_not_bids(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    out = tmp_path / "manifest.csv"
    assert _run(["--bids", str(tmp_path / "data"), "--image", "pet=suffix-pet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a BIDS dataset" in err and "dataset_description.json" in err
    assert not out.exists()
