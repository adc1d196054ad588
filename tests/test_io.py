"""Atomic writes: a full disk in the middle of writing a checkpoint leaves the previous one intact."""
from __future__ import annotations

import errno
import io

import pytest
import torch

import pruning._io as pio
from distill.checkpoint import load_checkpoint, save_checkpoint


class _FillingFile(io.FileIO):
    """A file on a disk that fills up after ``room`` bytes: the next write raises ENOSPC."""

    room = 2000

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def _disk_fills_up(monkeypatch) -> None:
    """Every file :mod:`pruning._io` opens is on the filling disk (text files through a buffered text layer)."""

    def fake_open(path: str, mode: str = "r"):
        raw = _FillingFile(path, mode.replace("b", ""))
        return raw if "b" in mode else io.TextIOWrapper(raw)

    monkeypatch.setattr(pio, "open", fake_open, raising=False)


def _no_temp_files(folder) -> bool:
    return not [f for f in folder.iterdir() if f.name.startswith(".tmp-")]


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    """torch.save fails midway (torch wraps the ENOSPC in its own RuntimeError): the old checkpoint is byte for
    byte the same, no temp file is left, and the error says what happened and what to do."""
    path = tmp_path / "last.pth"
    save_checkpoint(str(path), {"step": 1, "weights": torch.zeros(10)})
    before = path.read_bytes()
    _disk_fills_up(monkeypatch)
    with pytest.raises(OSError, match=r"no space left on the device while writing .*last\.pth; the file is "
                                      r"unchanged.*rerun") as err:
        save_checkpoint(str(path), {"step": 2, "weights": torch.randn(100_000)})
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and _no_temp_files(tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(str(path))["step"] == 1


def test_a_full_disk_during_a_text_write_and_other_errors(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    pio.atomic_write_text(path, "{}\n")
    _disk_fills_up(monkeypatch)
    with pytest.raises(OSError, match="the file is unchanged") as err:
        pio.atomic_write_text(path, "x" * 10_000)
    assert err.value.errno == errno.ENOSPC and path.read_text() == "{}\n" and _no_temp_files(tmp_path)
    monkeypatch.undo()

    def broken(tmp: str) -> None:  # any other failure propagates unchanged, still without a temp file left
        open(tmp, "w").write("half")
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        pio.atomic_write(path, broken)
    assert path.read_text() == "{}\n" and _no_temp_files(tmp_path)
    new = tmp_path / "new.pth"
    _disk_fills_up(monkeypatch)
    with pytest.raises(OSError, match="the file was not written"):
        pio.atomic_torch_save({"x": torch.randn(100_000)}, new)
    assert not new.exists() and _no_temp_files(tmp_path)
