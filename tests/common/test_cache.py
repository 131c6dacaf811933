"""The project cache: arrays made once per key (inputs, source text, library versions) and read back exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ganbert.common import cache
from ganbert.prep import brainmask


@pytest.fixture
def kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "things"


def _builder(calls: list[int]):  # type: ignore[no-untyped-def]
    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": np.linspace(0, 1, 5)}
    return build


def test_arrays_are_made_once_and_read_back_exactly(kept: Path, tmp_path: Path) -> None:
    source = tmp_path / "maker.py"
    source.write_text("version 1\n")
    calls: list[int] = []
    made = cache.arrays("things", _builder(calls), [str(source)], size=2)
    again = cache.arrays("things", _builder(calls), [str(source)], size=2)
    assert len(calls) == 1 and len(list(kept.iterdir())) == 1
    assert all(np.array_equal(made[k], again[k]) and made[k].dtype == again[k].dtype for k in made)
    cache.arrays("things", _builder(calls), [str(source)], size=3)  # other parts: made
    source.write_text("version 2\n")  # the maker edited: made again
    cache.arrays("things", _builder(calls), [str(source)], size=2)
    assert len(calls) == 3 and len(list(kept.iterdir())) == 3


def test_an_unreadable_file_is_made_again_and_off_keeps_nothing(kept: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    cache.arrays("things", _builder(calls), [])
    (path,) = kept.iterdir()
    path.write_bytes(b"PK\x03\x04 not a zip")
    assert cache.arrays("things", _builder(calls), [])["a"].shape == (2, 3) and len(calls) == 2
    assert np.load(path)["b"].shape == (5,)  # written again, whole
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    cache.arrays("things", _builder(calls), [])
    cache.arrays("things", _builder(calls), [])
    assert len(calls) == 4 and cache.folder("things") is None


def test_the_kept_template_is_the_one_nilearn_makes() -> None:
    head, mask, affine = brainmask.template()
    made = brainmask._make_template()
    for kept_array, key in ((head, "head"), (mask, "mask"), (affine, "affine")):
        assert kept_array.dtype == made[key].dtype and np.array_equal(kept_array, made[key])
