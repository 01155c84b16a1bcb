"""fastllm.bench.common's helpers for the GPU scripts."""
import sys

import pytest

from fastllm.bench.common import script_out_dir


def test_script_out_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["s.py", "out/a", "--x=1"])
    assert script_out_dir("usage").resolve() == tmp_path / "out/a"
    assert (tmp_path / "out/a").is_dir()
    monkeypatch.setattr(sys, "argv", ["s.py", "--skip-layers"])  # an option first: no folder named after it
    assert str(script_out_dir("usage")) == "."
    monkeypatch.setattr(sys, "argv", ["s.py", "--help"])
    with pytest.raises(SystemExit):
        script_out_dir("usage: s.py OUTDIR")
    assert "usage: s.py OUTDIR" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no "--help" or "--skip-layers" folder
