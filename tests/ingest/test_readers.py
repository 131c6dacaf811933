"""Readers and geometry on files no one here wrote (nibabel's shipped examples) and on synthetic checks."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from ganbert.config import GeometryConfig, tiny
from ganbert.ingest.nifti import VolumeError, read_volume
from ganbert.models import intensity
from ganbert.prep import grid

EXAMPLES = Path(data_path)
THREE_D = ["anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz"]
FOUR_D = ["example4d.nii.gz", "example_nifti2.nii.gz", "functional.nii"]
GEOMETRY = tiny().geometry
FINE = GeometryConfig(mri_size=(64, 64, 64), mri_fov_mm=128.0)  # 2 mm voxels, like the examples


@pytest.mark.parametrize("name", THREE_D)
def test_nibabel_3d_examples_conform(name: str) -> None:
    img = nib.load(str(EXAMPLES / name))
    vol = read_volume(EXAMPLES / name)
    assert vol.data.shape == img.shape and vol.data.dtype == np.float32
    np.testing.assert_allclose(vol.data, img.get_fdata(), rtol=1e-6)
    mri, affine = grid.conform_mri(img, FINE)
    assert mri.shape == FINE.mri_size and mri.dtype == np.uint8
    assert mri.min() == 0 and mri.max() >= 128  # input 0.1/99.9th percentiles -> 0/255, then interpolated
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(affine)[:3], FINE.mri_voxel_mm)
    np.testing.assert_allclose(grid.fov_centre(affine, mri.shape), grid.fov_centre(img.affine, img.shape))


def test_nibabel_example_with_nan_background_is_rejected_with_the_count() -> None:
    """resampled_anat_moved.nii marks voxels outside its source with NaN: the reader names the count."""
    with pytest.raises(VolumeError, match=r"resampled_anat_moved\.nii: 153 non-finite voxels \(NaN/Inf\)"):
        read_volume(EXAMPLES / "resampled_anat_moved.nii")


@pytest.mark.parametrize("name", FOUR_D)
def test_nibabel_4d_examples_as_pet(name: str) -> None:
    img = nib.load(str(EXAMPLES / name))
    vol = read_volume(EXAMPLES / name)
    assert vol.data.ndim == 4 and vol.frames == img.shape[3]
    mri_affine = grid.mri_affine_for(vol.affine, vol.data.shape, GEOMETRY)
    pet = grid.resample_pet(vol.data, vol.affine, mri_affine, GEOMETRY)
    assert pet.shape == (GEOMETRY.pet_frames, *GEOMETRY.pet_size) and pet.dtype == np.float32
    groups = np.array_split(np.arange(vol.frames), GEOMETRY.pet_frames)
    for t, frames in enumerate(groups):
        expect = grid.resample(vol.data[..., frames].mean(axis=3), vol.affine,
                                     grid.pet_affine(mri_affine, GEOMETRY), GEOMETRY.pet_size)
        np.testing.assert_allclose(pet[t], expect, rtol=1e-5, atol=1e-3)
    assert np.abs(pet).max() > 0


def test_4d_image_is_not_a_t1() -> None:
    with pytest.raises(ValueError, match=r"T1 is 4D with 2 frames"):
        grid.conform_mri(nib.load(str(EXAMPLES / "example4d.nii.gz")), GEOMETRY)


def test_non_nifti_formats_are_refused_by_the_reader() -> None:
    with pytest.raises(VolumeError, match=r"not a NIfTI file name"):
        read_volume(EXAMPLES / "test.mgz")
    with pytest.raises(VolumeError, match=r"not a NIfTI volume \(Cifti2Image\)|wrong dimensionality"):
        read_volume(EXAMPLES / "row_major.dconn.nii")


def _blob_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth random volume in RAS with a bright blob at a known world point; (data, affine, blob_mm)."""
    rng = np.random.default_rng(0)
    data = rng.random((40, 48, 36)).astype(np.float32) * 20
    affine = np.diag([3.0, 2.5, 3.5, 1.0])
    affine[:3, 3] = [-60.0, -70.0, -50.0]
    blob_vox = np.array([25, 14, 22])
    xx = np.indices(data.shape)
    data += 300 * np.exp(-(((xx - blob_vox[:, None, None, None]) ** 2).sum(0)) / 8.0)
    return data, affine, affine[:3, :3] @ blob_vox + affine[:3, 3]


def test_conform_is_orientation_invariant_and_places_world_points() -> None:
    data, affine, blob_mm = _blob_volume()
    ras = nib.Nifti1Image(data, affine)
    # the same image stored with permuted, flipped voxel axes (LIP-like) and the matching affine
    ornt = nib.orientations.axcodes2ornt(("P", "L", "I"))
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), ornt)
    other = ras.as_reoriented(transform)
    assert nib.aff2axcodes(other.affine) == ("P", "L", "I")
    geometry = GeometryConfig(mri_size=(64, 64, 64), mri_fov_mm=192.0)
    a, aff_a = grid.conform_mri(ras, geometry)
    b, aff_b = grid.conform_mri(other, geometry)
    np.testing.assert_allclose(aff_a, aff_b, atol=1e-9)
    assert np.mean(a.astype(int) == b.astype(int)) > 0.999 and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    peak = np.argwhere(a == 255).mean(axis=0)  # the blob saturates at the 99.9th percentile: its centroid
    assert np.linalg.norm(aff_a[:3, :3] @ peak + aff_a[:3, 3] - blob_mm) <= 0.5 * geometry.mri_voxel_mm


def test_pet_grid_shares_the_mri_centre() -> None:
    geometry = GeometryConfig()
    mri_affine = grid.mri_affine_for(np.diag([1.2, 1.0, 1.0, 1.0]), (176, 240, 256), geometry)
    pet_aff = grid.pet_affine(mri_affine, geometry)
    np.testing.assert_allclose(np.diag(pet_aff)[:3], geometry.pet_voxel_mm)
    np.testing.assert_allclose(grid.fov_centre(pet_aff, geometry.pet_size),
                               grid.fov_centre(mri_affine, geometry.mri_size))
    np.testing.assert_allclose(np.diag(mri_affine)[:3], 1.0)
    with pytest.raises(ValueError, match="mri_affine"):
        grid.pet_affine(np.eye(3), geometry)


def test_group_frames_averages_contiguous_groups() -> None:
    data = np.stack([np.full((3, 3, 3), float(k)) for k in range(5)], axis=3).astype(np.float32)
    grouped = grid.group_frames(data, 2)
    np.testing.assert_allclose(grouped[0, 0, 0], [1.0, 3.5])  # frames 0-2 and 3-4
    with pytest.raises(ValueError, match="PET has 5 frame"):
        grid.group_frames(data, 6)


def test_mri_stats_are_population_stats_over_all_voxels() -> None:
    arr = np.arange(256, dtype=np.uint8).reshape(4, 4, 16)
    mean, std = intensity.uint8_mri_stats(arr)
    assert (mean, std) == (127.5, float(np.std(np.arange(256.0))))
    with pytest.raises(ValueError, match="uint8"):
        intensity.uint8_mri_stats(arr.astype(np.float32))


@pytest.mark.parametrize("bad, reason", [
    (np.full((8, 8, 8), 3.0, np.float32), "constant image"),
    (np.where(np.arange(512).reshape(8, 8, 8) % 7 == 0, np.nan, 1.0).astype(np.float32), "74 non-finite"),
    (np.ones((8, 8), np.float32), "wrong dimensionality"),
])
def test_conform_mri_rejects_bad_volumes(bad: np.ndarray, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        grid.conform_mri(nib.Nifti1Image(bad, np.eye(4)), GEOMETRY)
