"""The pieces behind `inva manifest --bids`: entity keys as file names show them, the image header
check, and the screening of derivatives folders."""
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from inva_pyro.data.bids_checks import image_problem, mixed_kinds, screen_derivatives
from inva_pyro.data.bids_manifest import parse_image_spec
from inva_pyro.errors import InputError

VOLUME = nib.Nifti1Image(np.arange(27, dtype=np.float32).reshape(3, 3, 3), np.eye(4))


@pytest.mark.parametrize("key, name", [
    ("ses", "session"), ("acq", "acquisition"), ("ce", "ceagent"), ("rec", "reconstruction"), ("dir", "direction"),
    ("run", "run"), ("echo", "echo"), ("trc", "tracer"), ("desc", "desc"), ("space", "space"), ("label", "label"),
    ("hemi", "hemi"), ("res", "res"), ("den", "den"), ("task", "task"), ("seg", "segmentation"), ("mod", "modality"),
    ("acquisition", "acquisition"), ("tracer", "tracer"), ("suffix", "suffix"), ("extension", "extension"),
])
def test_file_name_keys_and_pybids_names_both_select(key, name):
    assert parse_image_spec(f"x={key}-A1,datatype-anat").filters == {name: "A1", "datatype": "anat"}


def test_a_key_given_twice_under_two_spellings():
    with pytest.raises(InputError, match="entity 'acquisition' given twice"):
        parse_image_spec("x=acq-a,acquisition-b")


@pytest.mark.parametrize("key", ["sub", "subject"])
def test_subject_selects_rows(key):
    with pytest.raises(InputError, match=f"'{key}' selects rows, not files"):
        parse_image_spec(f"x={key}-01,suffix-T1w")


def test_an_unplaceable_key_lists_the_keys():
    with pytest.raises(InputError, match=r"unknown BIDS entity 'zzzz' \(keys: .*acq, .*trc") as caught:
        parse_image_spec("x=zzzz-1")
    assert "\n" not in str(caught.value)


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_readable_images_pass(tmp_path):
    for name in ("a.nii", "a.nii.gz"):
        nib.save(VOLUME, tmp_path / name)
        assert image_problem(tmp_path / name) is None


def test_a_gzip_of_several_members_is_not_taken_for_a_cut_file(tmp_path):
    whole = VOLUME.to_bytes()  # the trailer of the last member holds that member's size only
    path = _write(tmp_path / "multi.nii.gz", gzip.compress(whole[:400]) + gzip.compress(whole[400:]))
    assert np.asarray(nib.load(path).dataobj).sum() == 351
    assert image_problem(path) is None


def test_readable_images_pass_whatever_their_extensions_hold(tmp_path):
    """An XML NIfTI extension (CIFTI's) is no web page; .mgz is gzip without .gz in its name."""
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    image.header.extensions.append(nib.nifti1.Nifti1Extension(32, b"<?xml version='1.0'?><CIFTI/>"))
    nib.save(image, tmp_path / "cifti_like.nii")
    nib.save(nib.MGHImage(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "aseg.mgz")
    assert image_problem(tmp_path / "cifti_like.nii") is None and image_problem(tmp_path / "aseg.mgz") is None


def test_content_a_clone_has_not_fetched(tmp_path):
    link = tmp_path / "sub-01_T1w.nii.gz"
    link.symlink_to("../.git/annex/objects/XX/YY/MD5E-s1234--abc.nii.gz/MD5E-s1234--abc.nii.gz")
    assert image_problem(link) == ("a link to a file that is not there (git-annex/DataLad content not fetched? "
                                   "datalad get)")


@pytest.mark.parametrize("name, content, reason", [
    ("empty.nii.gz", b"", "empty file (0 bytes): a placeholder, not an image"),
    ("page.nii.gz", b"<html><body>404</body></html>", "a web page, not an image (29 bytes; a failed download?)"),
    ("s3.nii", b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>",
     "XML text, not an image (61 bytes; a file server's error message?)"),
    ("annexed.nii.gz", b"/annex/objects/MD5E-s1234--abc.nii.gz\n",
     "a git-annex pointer, not the image (38 bytes; content not fetched: datalad get)"),
    ("lfs.nii.gz", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n",
     "a Git LFS pointer, not the image (65 bytes; content not fetched: git lfs pull)"),
    ("cut.mgz", gzip.compress(nib.MGHImage(np.zeros((4, 4, 4), np.float32), np.eye(4)).to_bytes()[:300]),
     "header only or cut short: the header describes 256 bytes of voxels, the file holds 16"),
    ("cut.nii", VOLUME.to_bytes()[:-8], ("header only or cut short: the header describes 108 bytes of voxels, "
                                        "the file holds 100")),
    ("cut.nii.gz", gzip.compress(VOLUME.to_bytes()[:-8]), ("header only or cut short: the header describes 108 "
                                                          "bytes of voxels, the file holds 100")),
])
def test_broken_images_say_why(tmp_path, name, content, reason):
    assert image_problem(_write(tmp_path / name, content)).startswith(reason)


def test_nibabel_messages_are_kept_whole(tmp_path):
    path = _write(tmp_path / "one-byte.nii", b"x")
    reason = image_problem(path)
    assert reason.startswith("nibabel cannot read it (1 byte): ") and reason.endswith(f'{path}"')
    assert image_problem(_write(tmp_path / "empty.gii", b"")).startswith("empty file")
    assert image_problem(_write(tmp_path / "bad.gii", b"<?xml version='1.0'?><GIFTI")).startswith(
        "nibabel cannot read it (27 bytes): ")


def test_runs_numbered_differently_are_one_kind_a_missing_task_is_not():
    rows = [{"suffix": "pet", "run": 1}, {"suffix": "pet", "run": 2}, None]
    assert mixed_kinds("pet", rows, {"suffix"}, str) == []
    rows = [{"suffix": "pet"}, {"suffix": "pet", "task": "rest"}, {"suffix": "pet", "space": "T1w"}]
    assert mixed_kinds("pet", rows, {"suffix"}, str) == [
        ("pet: files differ in space (space-T1w: 1 row, space-none: 2 rows); add space-VALUE or space-none to keep "
        "one kind"),
        "pet: files differ in task (task-rest: 1 row, task-none: 2 rows); add task-VALUE or task-none to keep one kind"]


def _description(folder: Path, pipeline: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generated = {"GeneratedBy": [{"Name": pipeline}]} if pipeline else {}
    (folder / "dataset_description.json").write_text(json.dumps({"Name": "d", "BIDSVersion": "1.8.0", **generated}))
    return folder


def test_derivatives_screened_as_pybids_would_index_them(tmp_path):
    root = tmp_path / "ds"
    prep = _description(root / "derivatives" / "prep", "prep")
    (root / "derivatives" / "freesurfer").mkdir()
    (root / "derivatives" / ".cache").mkdir()
    _description(root / "derivatives" / "unnamed", None)
    (root / "derivatives" / "broken").mkdir()
    (root / "derivatives" / "broken" / "dataset_description.json").write_text("{")
    other = _description(tmp_path / "elsewhere" / "prep", "prep")
    used, unused = screen_derivatives(root, [prep, other])  # prep named twice; another folder called prep
    assert used == [prep]
    assert unused == [(root / "derivatives" / "broken", "dataset_description.json is not valid JSON"),
                      (root / "derivatives" / "freesurfer", "no dataset_description.json"),
                      (root / "derivatives" / "unnamed",
                       'dataset_description.json names no pipeline (GeneratedBy: [{"Name": ...}])'),
                      (other, f"another derivatives folder of this name is used ({prep})")]


def test_a_derivatives_folder_that_is_one_dataset(tmp_path):
    root = tmp_path / "ds"
    derivatives = _description(root / "derivatives", "pipeline")
    (derivatives / "sub-01").mkdir()
    assert screen_derivatives(root, []) == ([derivatives], [])
