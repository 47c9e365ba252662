"""The result directory appears whole or not at all, and --overwrite never empties a stranger's folder."""
from __future__ import annotations

import os

import pytest

from EsegetaLib.errors import EsegetaError
from EsegetaLib.outputs import ResultDirectory, check_output_directory, leftovers


def snapshot(folder):
    """Every file under `folder` with its bytes (what 'left as it was' means)."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_commit_moves_everything_into_a_new_directory(tmp_path):
    final = tmp_path / "a" / "b" / "result"
    with ResultDirectory(final) as out:
        assert out.path.parent == final.parent and out.path != final
        (out.path / "run.json").write_text("{}")
        (out.path / "attributions").mkdir()
        (out.path / "attributions" / "X.nii.gz").write_bytes(b"x")
        assert not final.exists()  # nothing visible before the commit
        out.commit()
    assert snapshot(final) == {"attributions": None, "attributions/X.nii.gz": b"x", "run.json": b"{}"}
    assert leftovers(final) == []
    mode = final.stat().st_mode & 0o777
    assert mode == 0o777 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_or_interrupt_leaves_a_missing_directory_missing(tmp_path, error):
    final = tmp_path / "new" / "deeper" / "result"
    with pytest.raises(type(error)):
        with ResultDirectory(final) as out:
            (out.path / "partial.nii.gz").write_bytes(b"half")
            raise error
    assert not final.exists()
    assert not (tmp_path / "new").exists()  # parents it created are removed too
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_an_earlier_result_untouched(tmp_path):
    final = tmp_path / "result"
    final.mkdir()
    (final / "run.json").write_text('{"old": 1}')
    (final / "metrics.csv").write_text("method\nSaliency\n")
    before = snapshot(final)
    with pytest.raises(KeyboardInterrupt):
        with ResultDirectory(final, overwrite=True) as out:
            (out.path / "run.json").write_text('{"new": 1}')
            raise KeyboardInterrupt
    assert snapshot(final) == before
    assert leftovers(final) == []


def test_overwrite_replaces_an_earlier_result_entirely(tmp_path):
    final = tmp_path / "result"
    final.mkdir()
    (final / "run.json").write_text('{"old": 1}')
    (final / "stale.nii.gz").write_bytes(b"old map")
    with ResultDirectory(final, overwrite=True) as out:
        (out.path / "run.json").write_text('{"new": 1}')
        out.commit()
    assert snapshot(final) == {"run.json": b'{"new": 1}'}
    assert leftovers(final) == []


def test_empty_existing_directory_is_used(tmp_path):
    final = tmp_path / "empty"
    final.mkdir()
    with ResultDirectory(final) as out:
        (out.path / "run.json").write_text("{}")
        out.commit()
    assert snapshot(final) == {"run.json": b"{}"}


def test_non_empty_directory_is_refused_without_overwrite(tmp_path):
    final = tmp_path / "result"
    final.mkdir()
    (final / "run.json").write_text("{}")
    with pytest.raises(EsegetaError, match="not empty.*--overwrite"):
        check_output_directory(final)
    check_output_directory(final, overwrite=True)  # an earlier result may be replaced


def test_overwrite_refuses_a_folder_that_is_not_a_result(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes")
    with pytest.raises(EsegetaError, match="not an Esegeta result"):
        check_output_directory(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "my notes"


def test_overwrite_refuses_a_result_holding_the_input(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    volume = tmp_path / "volume.nii.gz"
    volume.write_bytes(b"v")
    with pytest.raises(EsegetaError, match="inside the output directory"):
        check_output_directory(tmp_path, overwrite=True, inputs=[volume])


def test_a_file_is_not_an_output_directory(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(EsegetaError, match="not a directory"):
        check_output_directory(target)


def test_directory_filled_during_the_run_is_not_clobbered(tmp_path):
    final = tmp_path / "result"
    with pytest.raises(EsegetaError, match="not empty"):
        with ResultDirectory(final) as out:
            (out.path / "run.json").write_text("{}")
            final.mkdir()
            (final / "theirs.txt").write_text("someone else's")
            out.commit()
    assert snapshot(final) == {"theirs.txt": b"someone else's"}
    assert leftovers(final) == []
