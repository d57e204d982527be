"""`inva manifest --bids` on the layouts people have: an MEG/MRI study with sessions and an empty-room
pseudo-subject, PET with tracers, sessions, blood data and placeholder images, raw data with fMRIPrep
derivatives and a FreeSurfer folder lacking its dataset description. Every tree is made here."""
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from inva_pyro import cli

RAW = json.dumps({"Name": "test", "BIDSVersion": "1.8.0"})
VOLUME = nib.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4))


def _derivative(name: str) -> str:
    return json.dumps({"Name": name, "BIDSVersion": "1.8.0", "DatasetType": "derivative",
                       "GeneratedBy": [{"Name": name}]})


def _file(root: Path, relative: str, content: bytes | str = b"") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _image(root: Path, relative: str) -> Path:
    """A readable 2x2x2 NIfTI volume."""
    path = _file(root, relative)
    nib.save(VOLUME, path)
    return path


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(["manifest", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _one_line_error(status: int, err: str, out_dir: Path) -> None:
    assert status == 2 and err.startswith("inva: error: ") and err.count("\n") == 1
    assert not any(p.suffix == ".csv" for p in out_dir.iterdir())


# ----- an MEG/MRI study: ses-meg and ses-mri, acq-/run-/echo-, an empty-room pseudo-subject --------
@pytest.fixture(scope="module")
def meg_mri(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("megmri") / "ds"
    _file(root, "dataset_description.json", RAW)
    _file(root, "participants.tsv", "participant_id\tage\nsub-01\t31\nsub-02\t25\nsub-emptyroom\tn/a\n")
    for sub in ("01", "02"):
        mri = f"sub-{sub}/ses-mri/anat/sub-{sub}_ses-mri"
        _image(root, f"{mri}_acq-mprage_T1w.nii.gz")
        _file(root, f"{mri}_acq-mprage_T1w.json", "{}")
        for echo in (1, 2):
            _image(root, f"{mri}_echo-{echo}_MEGRE.nii.gz")
        _image(root, f"sub-{sub}/ses-mri/func/sub-{sub}_ses-mri_task-faces_run-01_bold.nii.gz")
        for run in ("01", "02"):
            _file(root, f"sub-{sub}/ses-meg/meg/sub-{sub}_ses-meg_task-faces_run-{run}_meg.fif", b"\x00")
    for date in ("20090409", "20090410"):
        _file(root, f"sub-emptyroom/ses-{date}/meg/sub-emptyroom_ses-{date}_task-noise_meg.fif", b"\x00")
    return root


def test_one_session_of_an_meg_mri_study_with_file_name_keys(meg_mri, tmp_path, capsys):
    out = tmp_path / "m.csv"
    status, printed, _ = _run(["--bids", str(meg_mri), "--image", "t1=acq-mprage,suffix-T1w", "--session", "mri",
                               "--out", str(out)], capsys)
    assert status == 0
    table = _read(out)
    assert list(table["subject"]) == ["sub-01_ses-mri", "sub-02_ses-mri"]
    assert list(table["session"]) == ["mri", "mri"] and list(table["age"]) == ["31", "25"]
    assert table["t1"].tolist() == [str(meg_mri / f"sub-0{i}/ses-mri/anat/sub-0{i}_ses-mri_acq-mprage_T1w.nii.gz")
                                    for i in (1, 2)]
    assert "wrote 2 rows" in printed
    assert "left out 1 subject without session mri: sub-emptyroom" in printed
    assert "nibabel cannot read" not in printed and "missing for" not in printed


def test_rows_without_any_image_are_left_out_and_named(meg_mri, tmp_path, capsys):
    out = tmp_path / "m.csv"
    status, printed, _ = _run(["--bids", str(meg_mri), "--image", "t1=acquisition-mprage,suffix-T1w",
                               "--out", str(out)], capsys)
    assert status == 0
    assert list(_read(out)["subject"]) == ["sub-01_ses-mri", "sub-02_ses-mri"]
    assert "left out 1 subject without any image: sub-emptyroom" in printed
    assert "left out 2 session rows without any image: sub-01_ses-meg, sub-02_ses-meg" in printed


def test_excluded_subjects_with_or_without_prefix(meg_mri, tmp_path, capsys):
    out = tmp_path / "m.csv"
    status, printed, _ = _run(["--bids", str(meg_mri), "--image", "t1=acq-mprage,suffix-T1w", "--session", "ses-mri",
                               "--exclude-subjects", "sub-emptyroom,02", "--out", str(out)], capsys)
    assert status == 0 and list(_read(out)["subject"]) == ["sub-01_ses-mri"]
    assert "wrote 1 row to" in printed and "left out by --exclude-subjects: sub-emptyroom, sub-02" in printed


def test_echo_and_run_keys_select_one_of_several_files(meg_mri, tmp_path, capsys):
    out = tmp_path / "m.csv"
    status, _, _ = _run(["--bids", str(meg_mri), "--image", "megre=echo-2,suffix-MEGRE",
                         "--image", "bold=task-faces,run-1,suffix-bold", "--out", str(out)], capsys)
    assert status == 0
    table = _read(out)
    assert table["megre"].str.endswith("_echo-2_MEGRE.nii.gz").all()
    assert table["bold"].str.endswith("_task-faces_run-01_bold.nii.gz").all()


@pytest.mark.parametrize("options, problem", [
    (["--image", "megre=suffix-MEGRE"], ("matches 2 files of sub-01_ses-mri (sub-01/ses-mri/anat/sub-01_ses-mri_echo-1_"
                                        "MEGRE.nii.gz, sub-01/ses-mri/anat/sub-01_ses-mri_echo-2_MEGRE.nii.gz); "
                                        "they differ in echo (1, 2): add one to select a file, e.g. echo-1")),
    (["--image", "t1=acqu-mprage,suffix-T1w"], "unknown BIDS entity 'acqu' (did you mean 'acq'"),
    (["--image", "t1=ACQ-mprage,suffix-T1w"], "unknown BIDS entity 'ACQ' (entity keys are lower case: 'acq')"),
    (["--image", "t1=sub-01,suffix-T1w"], "'sub' selects rows, not files"),
    (["--image", "t1=acq-MPRAGE,suffix-T1w"], ("no image has acq-MPRAGE; values are case-sensitive, did you mean "
                                              "acq-mprage?")),
    (["--image", "t1=suffix-T1w", "--session", "mir"], ("--session mir: no subject has session ses-mir (sessions: "
                                                       "20090409, 20090410, meg, mri)")),
    (["--image", "t1=suffix-T1w", "--session", "MRI"], ("(sessions: 20090409, 20090410, meg, mri; labels are "
                                                       "case-sensitive: did you mean 'mri'?)")),
    (["--image", "t1=suffix-T1w", "--exclude-subjects", "emptyrom"], ("--exclude-subjects emptyrom: no subject "
                                                                     "sub-emptyrom (did you mean 'emptyroom'?)")),
    (["--image", "t1=suffix-T1w", "--session", "meg"], ("matches no file of the rows kept (only sub-01_ses-mri, "
                                                       "sub-02_ses-mri); check --session")),
])
def test_meg_mri_mistakes_end_with_one_line(meg_mri, tmp_path, capsys, options, problem):
    status, _, err = _run(["--bids", str(meg_mri), *options, "--out", str(tmp_path / "m.csv")], capsys)
    _one_line_error(status, err, tmp_path)
    assert problem in err


# ----- PET: tracers, sessions, blood data, placeholder and broken images ---------------------------
@pytest.fixture(scope="module")
def pet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pet") / "ds"
    _file(root, "dataset_description.json", RAW)
    for sub in ("01", "02", "03", "04", "05"):
        stem = f"sub-{sub}/ses-baseline/pet/sub-{sub}_ses-baseline"
        _file(root, f"{stem}_recording-manual_blood.tsv", "time\tplasma_radioactivity\n0\t0\n")
        _image(root, f"{stem}_trc-FDG_pet.nii.gz")
    _image(root, "sub-01/ses-baseline/pet/sub-01_ses-baseline_trc-CIMBI36_pet.nii.gz")
    _image(root, "sub-01/ses-rescan/pet/sub-01_ses-rescan_trc-CIMBI36_pet.nii.gz")
    _file(root, "sub-02/ses-baseline/pet/sub-02_ses-baseline_trc-CIMBI36_pet.nii.gz")  # a 0-byte placeholder
    _file(root, "sub-03/ses-baseline/pet/sub-03_ses-baseline_trc-CIMBI36_pet.nii",
          "<!DOCTYPE html><html><body>Sign in to download</body></html>")
    header_only = VOLUME.to_bytes()[:352]  # the 348-byte header and its 4-byte extension flag, no voxels
    _file(root, "sub-04/ses-baseline/pet/sub-04_ses-baseline_trc-CIMBI36_pet.nii.gz", gzip.compress(header_only))
    _image(root, "sub-05/ses-baseline/pet/sub-05_ses-baseline_task-rest_trc-CIMBI36_pet.nii.gz")
    return root


def test_pet_by_tracer_lists_unreadable_images(pet, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.csv"
    monkeypatch.chdir(pet.parent)  # the dataset named as users type it: a relative path
    status, printed, _ = _run(["--bids", "ds", "--image", "pet=trc-CIMBI36,suffix-pet", "--out", str(out)], capsys)
    assert status == 0
    table = _read(out)
    assert list(table["subject"]) == ["sub-01_ses-baseline", "sub-01_ses-rescan"] + [f"sub-0{i}_ses-baseline"
                                                                                     for i in range(2, 6)]
    assert all(table["pet"]) and "_blood" not in "".join(table["pet"])
    lines = printed.splitlines()
    start = lines.index("  3 images nibabel cannot read: the manifest keeps them, but inva fit will refuse these rows "
                        "(it stops at the first); fix the files or drop the rows (--strict: stop here instead)")
    assert lines[start + 1:start + 4] == [
        ("    sub-02/ses-baseline/pet/sub-02_ses-baseline_trc-CIMBI36_pet.nii.gz: empty file (0 bytes): a placeholder, "
        "not an image"),
        ("    sub-03/ses-baseline/pet/sub-03_ses-baseline_trc-CIMBI36_pet.nii: a web page, not an image "
        "(60 bytes; a failed download?)"),
        ("    sub-04/ses-baseline/pet/sub-04_ses-baseline_trc-CIMBI36_pet.nii.gz: header only or cut short: the header "
        "describes 32 bytes of voxels, the file holds 0")]
    assert ("  pet: files differ in task (task-rest: 1 row, task-none: 5 rows); add task-VALUE or task-none "
            "to keep one kind") in lines
    assert "left out" not in printed


def test_strict_refuses_unreadable_images(pet, tmp_path, capsys):
    status, _, err = _run(["--bids", str(pet), "--image", "pet=trc-CIMBI36,suffix-pet,task-none", "--strict",
                           "--out", str(tmp_path / "m.csv")], capsys)
    _one_line_error(status, err, tmp_path)
    assert "3 images nibabel cannot read (--strict): sub-02/ses-baseline/pet/" in err
    assert "empty file (0 bytes)" in err and "header only or cut short" in err


def test_one_session_of_pet_and_a_session_filter_in_the_image(pet, tmp_path, capsys):
    out = tmp_path / "m.csv"
    status, printed, _ = _run(["--bids", str(pet), "--image", "pet=trc-CIMBI36,suffix-pet", "--session", "rescan",
                               "--out", str(out)], capsys)
    assert status == 0 and list(_read(out)["subject"]) == ["sub-01_ses-rescan"]
    assert "wrote 1 row to" in printed and "left out 4 subjects without session rescan" in printed
    status, _, _ = _run(["--bids", str(pet), "--image", "fdg=ses-baseline,trc-FDG,suffix-pet", "--out", str(out)],
                        capsys)
    assert status == 0 and _read(out)["fdg"].str.contains("trc-FDG").all() and len(_read(out)) == 5


@pytest.mark.parametrize("image, problem", [
    ("pet=trc-cimbi36,suffix-pet", ("matches no file (no image has trc-cimbi36; values are case-sensitive, "
                                   "did you mean trc-CIMBI36?; derivatives included)")),
    ("pet=trc-PIB,suffix-pet", "no image has trc-PIB; values are case-sensitive, trc values here: CIMBI36, FDG;"),
    ("pet=suffix-pet", "matches 2 files of sub-01_ses-baseline"),
])
def test_pet_mistakes_end_with_one_line(pet, tmp_path, capsys, image, problem):
    status, _, err = _run(["--bids", str(pet), "--image", image, "--out", str(tmp_path / "m.csv")], capsys)
    _one_line_error(status, err, tmp_path)
    assert problem in err


# ----- raw data with fMRIPrep derivatives, and a FreeSurfer folder without a dataset description ----
MNI = "space-MNI152NLin2009cAsym"


@pytest.fixture(scope="module")
def fmriprep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmriprep") / "ds"
    _file(root, "dataset_description.json", RAW)
    _file(root, "derivatives/fmriprep/dataset_description.json", _derivative("fMRIPrep"))
    for sub in ("01", "02"):
        _image(root, f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz")
        prep = f"derivatives/fmriprep/sub-{sub}/anat/sub-{sub}"
        for name in ("_desc-preproc_T1w", f"_{MNI}_desc-preproc_T1w", f"_{MNI}_desc-brain_mask",
                     f"_{MNI}_label-GM_probseg"):
            _image(root, f"{prep}{name}.nii.gz")
        _file(root, f"derivatives/freesurfer/sub-{sub}/mri/aseg.mgz", b"\x00")
        _image(root, f"derivatives/freesurfer/sub-{sub}/anat/sub-{sub}_desc-aseg_dseg.nii.gz")
    _file(root, "derivatives/README", "notes")
    return root


def test_the_raw_t1w_next_to_fmriprep_outputs(fmriprep, tmp_path, capsys):
    out = tmp_path / "m.csv"
    status, printed, _ = _run(["--bids", str(fmriprep), "--image", "t1=suffix-T1w,desc-none",
                               "--image", f"gm={MNI},label-GM,suffix-probseg", "--out", str(out)], capsys)
    assert status == 0
    table = _read(out)
    assert table["t1"].tolist() == [str(fmriprep / f"sub-0{i}/anat/sub-0{i}_T1w.nii.gz") for i in (1, 2)]
    assert table["gm"].str.contains("derivatives/fmriprep").all()
    assert "  derivatives not used: derivatives/freesurfer (no dataset_description.json)" in printed.splitlines()
    assert printed.count("freesurfer") == 1


def test_several_matches_say_which_entity_tells_them_apart(fmriprep, tmp_path, capsys):
    status, _, err = _run(["--bids", str(fmriprep), "--image", "t1=suffix-T1w", "--out", str(tmp_path / "m.csv")],
                          capsys)
    _one_line_error(status, err, tmp_path)
    assert "matches 3 files of sub-01" in err
    assert "they differ in desc (none, preproc), space (MNI152NLin2009cAsym, none): add one to select a file, " \
           "e.g. desc-none" in err


def test_an_entity_only_unused_derivatives_have_points_at_them(fmriprep, tmp_path, capsys):
    status, _, err = _run(["--bids", str(fmriprep), "--image", "aseg=desc-aseg,suffix-dseg",
                           "--out", str(tmp_path / "m.csv")], capsys)
    _one_line_error(status, err, tmp_path)
    assert "no image has desc-aseg" in err and "derivatives not used: freesurfer (no dataset_description.json)" in err


def test_desc_needs_no_derivatives_to_be_known(tmp_path, capsys):
    root = tmp_path / "ds"
    _file(root, "dataset_description.json", RAW)
    _image(root, "sub-01/anat/sub-01_T1w.nii.gz")
    _image(root, "derivatives/freesurfer/sub-01/anat/sub-01_desc-aseg_dseg.nii.gz")
    out = tmp_path / "m.csv"
    status, printed, _ = _run(["--bids", str(root), "--image", "t1=suffix-T1w,desc-none", "--out", str(out)], capsys)
    assert status == 0 and len(_read(out)) == 1 and "derivatives/freesurfer (no dataset_description.json)" in printed
    status, _, err = _run(["--bids", str(root), "--image", "aseg=desc-aseg,suffix-dseg", "--out", str(out)], capsys)
    assert status == 2 and "unknown BIDS entity" not in err
    assert "no indexed file has a desc- entity" in err and "freesurfer (no dataset_description.json)" in err


def test_derivatives_given_outside_the_dataset(fmriprep, tmp_path, capsys):
    elsewhere = tmp_path / "derivs"
    _file(elsewhere, "smriprep/dataset_description.json", json.dumps({"Name": "x", "BIDSVersion": "1.8.0"}))
    _image(elsewhere, "smriprep/sub-01/anat/sub-01_desc-x_T1w.nii.gz")
    _image(elsewhere, "fastsurfer/sub-01/anat/sub-01_desc-y_T1w.nii.gz")
    out = tmp_path / "m.csv"
    status, printed, _ = _run(["--bids", str(fmriprep), "--derivatives", str(elsewhere), "--image",
                               "t1=suffix-T1w,desc-none", "--out", str(out)], capsys)
    assert status == 0
    assert (f"derivatives not used: derivatives/freesurfer (no dataset_description.json), {elsewhere}/fastsurfer "
            f"(no dataset_description.json), {elsewhere}/smriprep (dataset_description.json names no pipeline") \
        in printed
    status, _, err = _run(["--bids", str(fmriprep), "--derivatives", str(tmp_path / "nowhere"), "--image",
                           "t1=suffix-T1w", "--out", str(out)], capsys)
    assert status == 2 and err.count("\n") == 1 and "nowhere: derivatives folder not found" in err


def test_a_datalad_clone_without_its_content(tmp_path, capsys):
    """Images are links into git-annex, dangling until `datalad get`: named by their BIDS path."""
    root = tmp_path / "ds"
    _file(root, "dataset_description.json", RAW)
    fetched = _image(root, ".git/annex/objects/a/sub-01_T1w.nii.gz")
    for sub, target in (("01", fetched), ("02", root / ".git/annex/objects/b/sub-02_T1w.nii.gz")):
        (root / f"sub-{sub}/anat").mkdir(parents=True)
        (root / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz").symlink_to(target)
    out = root / "m.csv"
    status, printed, _ = _run(["--bids", str(root), "--image", "t1=suffix-T1w", "--out", str(out)], capsys)
    assert status == 0
    assert _read(out)["t1"].tolist() == ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz"]
    assert printed.splitlines()[1:] == [
        ("  1 image nibabel cannot read: the manifest keeps it, but inva fit will refuse its row; fix the file or "
        "drop the row (--strict: stop here instead)"),
        ("    sub-02/anat/sub-02_T1w.nii.gz: a link to a file that is not there (git-annex/DataLad content not "
        "fetched? datalad get)")]
