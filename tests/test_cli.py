"""The command line: exit codes, reports, JSON, PNGs, formatting; never a traceback."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from s2dsl.cli import main

from conftest import EXAMPLES

COVERED = """\
pattern good {
    block = 64
    heads = 8
    kv_heads = 2
    causal
    heads 0..7 {
        window 4
        stride 8 offset h
    }
}
"""
HOLES = COVERED.replace("stride 8 offset h", "stride 8").replace("good", "holes")
EMPTY_ROWS = """\
pattern empty {
    block = 64
    heads = 4
    causal
    heads * {
        shard h of 4
    }
}
"""
SYNTAX = "pattern p {\n    block = 64\n    heads = 4\n    heads 0..3 { window }\n}\n"
SEMANTIC = "pattern p {\n    block = 64\n    heads = 4\n    heads 0..2 { window 4 }\n}\n"


@pytest.fixture
def write(tmp_path):
    def _write(text, name="p.s2"):
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return _write


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------ check
def test_check_covered_exit_0(capsys, write):
    code, out, err = run(capsys, "check", write(COVERED))
    assert code == 0, err
    assert "pattern good" in out and "COVERED for every sequence length" in out
    assert "empty rows    none" in out and "kv-efficient  yes" in out
    assert "kv head 0 (4 q heads): misses 4 of 8 residues mod 8; cache 32.0 MiB" in out
    for column in ("8K", "32K", "128K", "limit", "union"):
        assert column in out
    # heads differing only by shard share one row of the density table
    assert "0..7   window 4 + stride 8" in out


def test_check_not_covered_exit_1(capsys, write):
    code, out, _ = run(capsys, "check", write(HOLES))
    assert code == 1
    assert "NOT COVERED" in out and "counterexample: (i, j) = (5, 1)" in out
    assert "j mod 8 in {1..7}" in out


def test_check_empty_rows_exit_1(capsys, write):
    code, out, _ = run(capsys, "check", write(EMPTY_ROWS))
    assert code == 1
    assert "COVERED for every sequence length" in out
    assert "empty rows    YES" in out and "head 1: query block 0" in out


@pytest.mark.parametrize("text, where, what", [
    (SYNTAX, ":4:25: syntax error: unexpected '}'", "expected"),
    (SEMANTIC, ":1:1: error: pattern 'p' leaves heads 3 unassigned", "hint:"),
])
def test_check_invalid_exit_2_without_traceback(capsys, write, text, where, what):
    path = write(text)
    code, out, err = run(capsys, "check", path)
    assert code == 2 and out == ""
    assert err.startswith(path + where), err
    assert what in err and "^" in err and "Traceback" not in err


def test_check_missing_file_and_directory(capsys, tmp_path):
    code, _, err = run(capsys, "check", str(tmp_path / "nope.s2"))
    assert code == 2 and "nope.s2: no such file" in err and "Traceback" not in err
    code, _, err = run(capsys, "check", str(tmp_path))
    assert code == 2 and "is a directory" in err


def test_check_worst_code_over_files(capsys, write):
    good, holes = write(COVERED, "a.s2"), write(HOLES, "b.s2")
    assert run(capsys, "check", good, holes)[0] == 1
    assert run(capsys, "check", good, write(SYNTAX, "c.s2"))[0] == 2


def test_check_json(capsys, write):
    code, out, _ = run(capsys, "check", "--json", write(COVERED + "\n" + HOLES))
    assert code == 1
    data = json.loads(out)
    assert [d["pattern"] for d in data] == ["good", "holes"]
    for d in data:
        for key in ("pattern", "covered", "counterexample", "rows_nonempty", "kv_efficient", "density", "file"):
            assert key in d
        assert set(d["density"]) == {"8192", "32768", "131072"}
        assert all(0 < v <= 1 for v in d["density"].values())
    good, holes = data
    assert good["covered"] and good["counterexample"] is None and good["density"]["8192"] == 1.0
    assert not holes["covered"]
    assert holes["counterexample"]["missing_residues"] == [1, 2, 3, 4, 5, 6, 7]
    assert holes["counterexample"]["modulus"] == 8


def test_check_pattern_option(capsys, write):
    path = write(COVERED + "\n" + HOLES)
    code, out, _ = run(capsys, "check", "--pattern", "good", path)
    assert code == 0 and "holes" not in out
    code, _, err = run(capsys, "check", "--pattern", "nope", path)
    assert code == 2 and "no pattern named 'nope'" in err and "good, holes" in err


def test_check_reports_model_plans(capsys, write):
    text = COVERED + "\nmodel m {\n    layers = 8\n    every 2 from 1 -> dense\n    rest -> good\n}\n"
    code, out, _ = run(capsys, "check", write(text))
    assert code == 0
    assert "model m: 8 layers; good: layers 0..6 step 2; dense: layers 1..7 step 2" in out


def test_subprocess_python_m_no_traceback(tmp_path, cli_env):
    bad = tmp_path / "bad.s2"
    bad.write_text(SEMANTIC)
    proc = subprocess.run([sys.executable, "-m", "s2dsl", "check", str(bad)], capture_output=True, text=True,
                          env=cli_env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "leaves heads 3 unassigned" in proc.stderr and "Traceback" not in proc.stderr
    good = tmp_path / "good.s2"
    good.write_text(COVERED)
    proc = subprocess.run([sys.executable, "-m", "s2dsl", "check", "--json", str(good)], capture_output=True,
                          text=True, env=cli_env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["covered"] is True


def test_usage_errors(capsys):
    assert run(capsys, )[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "--version")[0] == 0


# ------------------------------------------------------------------------- show
def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_show_writes_png(capsys, write, tmp_path):
    out = tmp_path / "good.png"
    code, stdout, err = run(capsys, "show", write(COVERED), "--png", str(out), "--seq", "2048")
    assert code == 0, err
    assert f"wrote {out}" in stdout
    width, height = _png_size(out)
    assert width > 400 and height > 300
    import matplotlib.image
    image = matplotlib.image.imread(str(out))
    assert image.shape[:2] == (height, width)


def test_show_uncovered_cells_are_red(capsys, write, tmp_path):
    out = tmp_path / "holes.png"
    assert run(capsys, "show", write(HOLES), "--png", str(out), "--seq", "1024")[0] == 0
    import matplotlib.image
    rgb = matplotlib.image.imread(str(out))[..., :3]
    red = (rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.2) & (rgb[..., 2] < 0.2)
    assert red.sum() > 500


def test_show_several_patterns_get_suffixes(capsys, write, tmp_path):
    path = write(COVERED + "\n" + HOLES)
    out = tmp_path / "fig.png"
    code, stdout, _ = run(capsys, "show", path, "--png", str(out))
    assert code == 0
    for name in ("good", "holes"):
        _png_size(tmp_path / f"fig-{name}.png")
    assert not out.exists()
    out2 = tmp_path / "one.png"
    assert run(capsys, "show", path, "--pattern", "holes", "--png", str(out2))[0] == 0
    _png_size(out2)


def test_show_invalid(capsys, write, tmp_path):
    code, _, err = run(capsys, "show", write(SYNTAX), "--png", str(tmp_path / "x.png"))
    assert code == 2 and "syntax error" in err and "Traceback" not in err
    code, _, err = run(capsys, "show", write(COVERED), "--pattern", "zzz", "--png", str(tmp_path / "x.png"))
    assert code == 2 and "no pattern named 'zzz'" in err


# -------------------------------------------------------------------------- fmt
MESSY = "const w=4 # window\npattern p{block=64;heads=2 heads *{window w;dense}}\n"


def test_fmt_prints_canonical(capsys, write):
    path = write(MESSY)
    code, out, _ = run(capsys, "fmt", path)
    assert code == 0
    assert out.startswith("const w = 4  # window\n\npattern p {\n    block = 64\n")
    assert open(path).read() == MESSY  # untouched


def test_fmt_check_and_write(capsys, write):
    path = write(MESSY)
    code, _, err = run(capsys, "fmt", "--check", path)
    assert code == 1 and "not formatted" in err
    code, out, _ = run(capsys, "fmt", "--write", path)
    assert code == 0 and "formatted" in out
    assert run(capsys, "fmt", "--check", path)[0] == 0
    assert run(capsys, "fmt", "--write", path)[1] == ""  # nothing left to do


def test_fmt_invalid(capsys, write):
    code, _, err = run(capsys, "fmt", write(SYNTAX))
    assert code == 2 and ":4:25: syntax error" in err
    assert run(capsys, "fmt", "--check", "--write", write(MESSY))[0] == 2  # mutually exclusive


def test_compile_prints_generated_triton_source(capsys):
    assert main(["compile", str(EXAMPLES / "phi3_small.s2"), "--kernel", "fwd"]) == 0
    source = capsys.readouterr().out
    assert "@triton.jit" in source and "pattern: phi3_small" in source
    compile(source, "<generated>", "exec")  # valid Python
    # the per-head residues of Phi-3-small's kv groups are in the table
    assert "[16, 0, 8, 1, 7]" in source
    assert main(["compile", str(EXAMPLES / "phi3_small.s2"), "--pattern", "nope"]) == 2


@pytest.mark.parametrize("target,one_grid", [("gpu", True), ("interpreter", False)])
def test_compile_backward_shows_the_tiles_the_runtime_uses(capsys, target, one_grid):
    """``--kernel bwd`` prints the backward with the backward's own tiles for the target."""
    assert main(["compile", str(EXAMPLES / "phi3_small.s2"), "--kernel", "bwd", "--target", target]) == 0
    source = capsys.readouterr().out
    compile(source, "<generated>", "exec")
    assert "def dkdv_kernel(" in source and "def backward_kernel(" in source
    assert f"ONE_GRID = {one_grid}" in source
