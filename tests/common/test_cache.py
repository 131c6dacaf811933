"""The project cache: arrays made once per key (inputs, source text, library versions) and read back exactly."""

from __future__ import annotations

import subprocess
import sys
import time
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


MAKER = """
import sys, time
from pathlib import Path
import numpy as np
from ganbert.common import cache
go, log = Path(sys.argv[1]), Path(sys.argv[2])
Path(sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.01)
def build():
    with log.open("a") as f:
        f.write("made\\n")
    time.sleep(1.0)
    return {"a": np.arange(4)}
print(int(cache.arrays("things", build, [], size=2)["a"].sum()))
"""


def test_two_processes_that_need_the_same_arrays_make_them_once(kept: Path, tmp_path: Path) -> None:
    """Both ask at the same moment; the second waits for the first's arrays instead of making them too."""
    go, log = tmp_path / "go", tmp_path / "made.log"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", MAKER, str(go), str(log), str(r)], stdout=subprocess.PIPE,
                              text=True) for r in ready]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and [o.strip() for o in outs] == ["6", "6"], outs
    assert log.read_text() == "made\n"
    assert len(list(kept.iterdir())) == 1


def test_the_kept_template_is_the_one_nilearn_makes() -> None:
    head, mask, affine = brainmask.template()
    made = brainmask._make_template()
    for kept_array, key in ((head, "head"), (mask, "mask"), (affine, "affine")):
        assert kept_array.dtype == made[key].dtype and np.array_equal(kept_array, made[key])
