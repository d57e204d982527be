"""gzip through zlib-ng (data/gz.py): a file's first member read as the gzip module reads it, errors
on damage, valid and reproducible files written, and a .nii.gz of several members read like any other."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from inva_pyro.data import gz
from inva_pyro.data.io import load_volume, save_nifti

PAYLOAD = np.random.default_rng(0).normal(size=50_000).astype(np.float32).tobytes()


def test_zlib_ng_is_the_one_in_use():
    assert gz._zlib.__name__ == "zlib_ng.zlib_ng" and gz.WRITE_LEVEL == 2


def test_the_first_member_is_read_whatever_the_size_hint():
    one = gzip.compress(PAYLOAD)
    assert gz.first_member(one, len(PAYLOAD)) == gzip.decompress(one) == PAYLOAD
    assert gz.first_member(one, 10) == PAYLOAD  # a short hint only costs a larger buffer later
    several = gzip.compress(PAYLOAD[:1000]) + gzip.compress(PAYLOAD[1000:])
    assert gz.first_member(several, len(PAYLOAD)) == PAYLOAD[:1000]  # the caller checks the length


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_stream_raises(damage):
    raw = bytearray(gzip.compress(PAYLOAD))
    if damage == "truncated":
        raw = raw[:-100]
    else:
        raw[len(raw) // 2] ^= 0xFF
    with pytest.raises(Exception):
        gz.first_member(bytes(raw), len(PAYLOAD))


def test_written_files_are_gzip_and_identical_across_calls():
    written = gz.gzip_bytes(PAYLOAD)
    assert gzip.decompress(written) == PAYLOAD
    assert gz.gzip_bytes(PAYLOAD) == written
    assert len(written) < len(PAYLOAD)


@pytest.mark.parametrize("split", [400, None])  # the image across two members / all in the first, then junk
def test_a_nifti_of_several_gzip_members_reads_like_one_of_one(tmp_path, split):
    volume = np.random.default_rng(1).normal(size=(6, 5, 4)).astype(np.float32)
    save_nifti(volume, np.eye(4), None, tmp_path / "one.nii.gz")
    raw = gzip.decompress((tmp_path / "one.nii.gz").read_bytes())
    members = [raw[:split], raw[split:]] if split else [raw, b"trailing bytes"]
    (tmp_path / "two.nii.gz").write_bytes(b"".join(gzip.compress(m) for m in members))
    for name in ("one.nii.gz", "two.nii.gz"):
        np.testing.assert_array_equal(np.asarray(load_volume(tmp_path / name).dataobj), volume)
    assert nib.load(tmp_path / "two.nii.gz").shape == (6, 5, 4)
