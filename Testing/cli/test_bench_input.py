"""`esegeta bench` with bad input: one line naming the problem and what to do, exit 2, before any
model is loaded or anything timed (no benchmark.json written)."""
from __future__ import annotations

import json

import pytest

from EsegetaLib.cli import main


@pytest.mark.parametrize("argv, words", [
    (["--sizes", "foo", "--quick"], ["--sizes", "'foo'", "IxJxK"]),
    (["--sizes", "16x0x16", "--quick"], ["--sizes", "'16x0x16'"]),
    (["--methods", "Bogus", "--sizes", "16", "--quick"], ["Unknown method 'Bogus'", "esegeta methods"]),
    (["--methods", "LRP", "--sizes", "16", "--quick"], ["--methods", "'LRP'", "Saliency"]),
    (["--skip", "foo", "--sizes", "16", "--quick"], ["--skip", "'foo'", "captum, torchesegeta"]),
    (["--from-json", "nothere.json"], ["--from-json", "'nothere.json'", "--json"]),
])
def test_bad_bench_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", *argv, "--json", str(tmp_path / "bench.json")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esegeta: error:"), captured.err
    assert "internal error" not in captured.err and "Traceback" not in captured.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert captured.out == "" and not (tmp_path / "bench.json").exists()


def test_from_json_not_json_and_good_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["bench", "--from-json", str(bad)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"rows": []}))
    assert main(["bench", "--from-json", str(good)]) == 0
