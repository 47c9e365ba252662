"""`--threads N` sets torch's CPU threads for the run; a bad value is a one-line error (exit 2)."""
import torch

from helpers import write_torchscript, write_volume
from EsegetaLib.cli import main


def test_threads_option_sets_torch_threads(tmp_path):
    volume = write_volume(tmp_path / "v.nii.gz")
    model = write_torchscript(tmp_path / "m.pt")
    before = torch.get_num_threads()
    try:
        code = main(["explain", str(volume), "--model", str(model), "--methods", "Saliency", "--region", "whole",
                     "--metrics", "none", "--no-scene", "--threads", "1", "--out", str(tmp_path / "out"), "--quiet"])
        assert code == 0 and torch.get_num_threads() == 1
        assert (tmp_path / "out" / "attributions").is_dir()
    finally:
        torch.set_num_threads(before)


def test_bad_threads_value_is_one_line_error(tmp_path, capsys):
    code = main(["explain", "v.nii.gz", "--model", "m.pt", "--threads", "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--threads" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
