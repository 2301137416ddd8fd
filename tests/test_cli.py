"""The command line: bad input exits 2 with one line on stderr (never a traceback);
the listing commands answer with exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from normbench import backends, cli, datasets, spec as spec_module


def _main(argv, capsys) -> tuple[int, str, str]:
    """cli.main in process; argparse's own errors arrive as SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_usage_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv,fragments", [
    (["run", "smoke", "--backend", "nosuchbackend"], ["nosuchbackend", "torch"]),
    (["run", "nosuchspec", "--backend", "torch"], ["nosuchspec", "smoke"]),
    (["run", "{tmp}/missing.toml", "--backend", "torch"], ["missing.toml"]),
    (["run", "smoke", "--backend", "torch", "--steps", "0"], ["--steps"]),
    (["run", "smoke", "--backend", "torch", "--steps", "abc"], ["--steps", "abc"]),
    (["run", "smoke", "--backend", "torch", "--seeds", "-1"], ["--seeds"]),
    (["reproduce", "nosuchexperiment"], ["nosuchexperiment", "mnist-cnn"]),
    (["report", "{tmp}", "--experiment", "nosuchexperiment"], ["nosuchexperiment"]),
    (["report", "{tmp}"], ["no finished runs"]),
    (["report", "{tmp}/absent"], ["absent"]),
    (["specs", "nosuchspec"], ["nosuchspec"]),
], ids=["unknown-backend", "unknown-spec", "missing-spec-file", "steps-zero", "steps-not-a-number", "seeds-negative",
        "unknown-experiment", "report-unknown-experiment", "report-empty-dir", "report-absent-dir", "specs-unknown"])
def test_bad_input_exits_2_with_one_line(argv, fragments, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing written into the repository by accident
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = _main(argv, capsys)
    _assert_usage_error(code, err, *fragments)


def test_bad_spec_content_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(spec_module.bundled_specs()["smoke"].read_text().replace('model = "cnn-tiny"', 'model = "resnet"'))
    code, _, err = _main(["run", str(bad), "--backend", "torch", "--out", str(tmp_path / "out")], capsys)
    _assert_usage_error(code, err, "model", "resnet")


def test_run_refuses_a_second_backend(tmp_path, capsys):
    # argparse alone would keep the last --backend and train only that one, without a word.
    code, _, err = _main(["run", "smoke", "--backend", "torch", "--backend", "jax", "--out", str(tmp_path / "out")], capsys)
    _assert_usage_error(code, err, "--backend given twice", "'torch'", "'jax'", "normbench reproduce")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="a GPU is present: --device cuda is not absent here")
def test_absent_device_exits_2(backend_name, tmp_path, capsys):
    code, _, err = _main(["run", "smoke", "--backend", backend_name, "--device", "cuda", "--steps", "1",
                          "--out", str(tmp_path / "out")], capsys)
    _assert_usage_error(code, err, "cuda")
    assert not (tmp_path / "out").exists()  # checked before anything is written


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="a GPU is present: --device cuda is not absent here")
def test_parity_on_an_absent_device_exits_2(capsys):
    from normbench import backends

    installed = backends.available()
    if len(installed) < 2:
        pytest.skip("parity needs two installed backends")
    argv = ["parity", "smoke", "--device", "cuda", "--steps", "1"] + [a for b in installed[:2] for a in ("--backend", b)]
    code, out, err = _main(argv, capsys)
    _assert_usage_error(code, err, "cuda")
    assert out == ""  # refused before any step ran


def test_parity_compares_in_the_specs_dtype_unless_told(monkeypatch, tmp_path, capsys):
    from normbench import parity

    installed = backends.available()
    if len(installed) < 2:
        pytest.skip("parity needs two installed backends")
    path = tmp_path / "double.toml"
    path.write_text(spec_module.to_toml(spec_module.load("smoke").replace(dtype="float64")))
    assert spec_module.load(path).dtype == "float64"
    asked = []
    monkeypatch.setattr(parity, "run_parity", lambda spec, dtype, **kw: asked.append(dtype) or (True, "ok"))
    pair = [a for b in installed[:2] for a in ("--backend", b)]
    assert _main(["parity", str(path), *pair], capsys)[0] == 0
    assert _main(["parity", str(path), "--dtype", "float32", *pair], capsys)[0] == 0
    assert _main(["parity", "smoke", *pair], capsys)[0] == 0
    assert asked == ["float64", "float32", "float32"]


@pytest.mark.parametrize("argv", [["run", "smoke", "--backend", "nosuchbackend"],
                                  ["run", "smoke", "--backend", "torch", "--steps", "0"]], ids=["usage", "argparse"])
def test_console_script_errors(argv, tmp_path):
    """The same contract from the installed script, in a real process."""
    script = Path(sys.executable).with_name("normbench")
    proc = subprocess.run([str(script), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == ""


# ----------------------------------------------------------------------------- listings


def test_list(capsys):
    code, out, _ = _main(["list"], capsys)
    assert code == 0
    for name in [*spec_module.bundled_specs(), "mnist-cnn", *backends.names(), *datasets.names()]:
        assert name in out, name


def test_specs(capsys):
    code, out, _ = _main(["specs"], capsys)
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line and not line.startswith(("`", " "))]
    assert set(spec_module.bundled_specs()) <= set(listed)


def test_specs_name_prints_the_bundled_toml(capsys):
    code, out, _ = _main(["specs", "mnist-cnn"], capsys)
    assert code == 0
    assert out == spec_module.bundled_specs()["mnist-cnn"].read_text()
    assert spec_module.loads(out).hash() == spec_module.load("mnist-cnn").hash()  # copyable as is


def test_specs_format(capsys):
    code, out, _ = _main(["specs", "--format"], capsys)
    assert code == 0
    for field in ["[optimizer]", "[schedule]", "[[variant]]", "auxiliary_losses", "affine",
                  "running_decay", "log_epsilon", "track_percentiles"]:
        assert field in out, field
    from normbench import auxiliary_losses, normalizations

    # Every registered method and loss is documented, with each of its options.
    for registry in (normalizations, auxiliary_losses):
        for name, cls in registry.REGISTRY.items():
            assert f"\n  {name} " in out, name
            for option in cls.options:
                assert f"      {option.name} (" in out, (name, option.name)


def test_backends(capsys):
    code, out, _ = _main(["backends"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert set(backends.names()) <= set(lines)
    for name in backends.names():
        assert ("available" in lines[name].split(None, 1)[1]
                and "not" not in lines[name]) == backends.is_available(name), lines[name]


def test_datasets(capsys):
    code, out, _ = _main(["datasets"], capsys)
    assert code == 0
    from normbench import datasets

    assert [line.split()[0] for line in out.splitlines()] == datasets.names()


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
@pytest.mark.parametrize("set_by", ["option", "env"])
def test_unusable_data_dir_names_the_option_or_variable(where, set_by, tmp_path, capsys, monkeypatch):
    """`--data-dir /proc/x` once printed only "[Errno 2] No such file or directory: '/proc/x'"."""
    if not backends.available():
        pytest.skip("no backend installed: `run` stops at the backend before loading data")
    if where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        data_dir = Path("/proc/normbench-no-such-dir")
    else:
        (tmp_path / "a-file").write_text("not a directory")
        data_dir = tmp_path / "a-file" / "data"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NORMBENCH_DATA_DIR", raising=False)
    argv = ["run", "smoke", "--backend", backends.available()[0], "--out", str(tmp_path / "out"), "--no-progress"]
    if set_by == "option":
        argv += ["--data-dir", str(data_dir)]
        named = f"--data-dir {data_dir}: "
    else:
        monkeypatch.setenv("NORMBENCH_DATA_DIR", str(data_dir))
        named = f"NORMBENCH_DATA_DIR={data_dir}: "
    code, _, err = _main(argv, capsys)
    _assert_usage_error(code, err, named, f"the data cache {data_dir / 'mnist'} cannot be written",
                        "pass a writable directory")
    assert "[Errno" not in err
    assert not (tmp_path / "out").exists()  # the data failed before any results directory was made


def test_no_command_prints_help(capsys):
    code, out, _ = _main([], capsys)
    assert code == 2
    assert "run" in out and "report" in out


def test_models_lists_every_architecture_with_counts(capsys):
    from normbench import architectures

    code, out, _ = _main(["models"], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert list(rows) == architectures.names()
    # cnn3 by hand: kernels 5*5*1*32 + 5*5*32*16 + 5*5*16*8 + 128*10, biases 32 + 16 + 8 + 10;
    # multiply-accumulates 14*14*32*25 + 7*7*16*800 + 4*4*8*400 + 128*10 = 836,480.
    assert rows["cnn3"][4] == "18,146" and rows["cnn3"][5] == f"{2 * 836480 / 1e6:.2f}"
    code, out, _ = _main(["models", "--normalization", "batch_norm"], capsys)
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["cnn3"][4] == f"{18146 - 56 + 2 * 56:,}"  # no biases; a scale and a shift per channel


def test_models_says_where_a_method_does_not_fit(capsys):
    code, out, _ = _main(["models", "--normalization", "group_norm"], capsys)
    assert code == 0 and "cnn3" in out and "not divisible by groups = 32" in out
    code, _, err = _main(["models", "--normalization", "nope"], capsys)
    assert code == 2 and "--normalization: unknown method 'nope'" in err and "\n" not in err.strip()
