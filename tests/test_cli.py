"""The `fusedgru` command: info lists every backend with its state, check passes on what is
here and fails (non-zero exit) on a backend that computes the wrong thing."""

import os
import subprocess
import sys

import torch

import fusedgru
from fusedgru import backends, cli, reference


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fusedgru", *args], capture_output=True,
                          text=True, timeout=600)


def test_info_lists_versions_and_backends():
    p = _run("info")
    assert p.returncode == 0, p.stderr
    for word in ("fusedgru", "torch", "device", "reference", "available", "auto picks"):
        assert word in p.stdout
    for name in backends.BACKEND_NAMES:
        assert f"  {name} " in p.stdout


def test_check_passes_for_the_reference():
    p = _run("check", "--backends", "reference")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reference  cpu" in p.stdout and "FAIL" not in p.stdout
    assert "4 passed, 0 failed" in p.stdout


def test_check_fails_on_a_wrong_backend(install_backend, capsys):
    """A backend whose backward drops one term must be caught by `fusedgru check`."""

    def bad_backward(*args):
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = reference.gru_layer_backward(*args)
        return dx, dh0, dw_ih, dw_hh * 0.999, db_ih, db_hh

    class Broken:
        forward = staticmethod(reference.gru_layer_forward)
        backward = staticmethod(bad_backward)
        unavailable_reason = staticmethod(lambda: None)
        unsupported_reason = staticmethod(lambda device_type, dtype: None)

    install_backend("broken", Broken(), "a deliberately wrong backend")
    assert cli.main(["check", "--backends", "broken"]) == 1
    out = capsys.readouterr().out
    assert "FAIL broken cpu torch.float64" in out and "dw_hh" in out


def test_check_rejects_an_unknown_backend_name():
    """A misspelt backend is a usage error naming the valid backends, not a silent skip or a
    traceback, and nothing is checked."""
    p = _run("check", "--backends", "reference", "refrence")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert "invalid choice: 'refrence'" in p.stderr
    for name in backends.BACKEND_NAMES:
        assert f"'{name}'" in p.stderr, p.stderr


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="console_scripts") if e.name == "fusedgru"]
    assert eps and eps[0].value == "fusedgru.cli:main"


def test_bench_and_demo_receive_their_own_options():
    """`fusedgru bench`/`demo` hand every later argument, options included, to their own parser
    (an argparse REMAINDER in the top-level parser would reject a leading `--grid`)."""
    for cmd, word in (("bench", "--grid"), ("demo", "--epochs")):
        p = _run(cmd, "--help")
        assert p.returncode == 0, p.stderr
        assert word in p.stdout
    p = _run("bench", "--no-such-option")
    assert p.returncode == 2 and "--no-such-option" in p.stderr
    top = _run("--help")
    assert top.returncode == 0 and "bench" in top.stdout and "demo" in top.stdout


def test_check_without_gpu_runs_every_backend_with_the_interpreter_unset():
    """A user's shell has no TRITON_INTERPRET: `fusedgru check` still checks the Triton
    kernels (through the interpreter, in a fresh process) next to the other backends."""
    if torch.cuda.is_available():
        import pytest

        pytest.skip("with a GPU the Triton kernels run compiled; the interpreter is not used")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "fusedgru", "check"], capture_output=True,
                       text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    for name in fusedgru.available_backends():  # this process: interpreter on (conftest)
        assert f"\n{name} " in p.stdout, p.stdout
    assert " failed" in p.stdout and "FAIL" not in p.stdout


def test_interpreter_switched_on_too_late_is_reported():
    """TRITON_INTERPRET=1 set after triton was imported cannot work (triton's own library
    functions were compiled-only): the backend says so instead of failing inside a kernel."""
    code = ("import os, torch, triton.language; os.environ['TRITON_INTERPRET'] = '1'; "
            "import fusedgru; print(fusedgru.backend_status()['triton'])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert "set after triton had been imported" in p.stdout, p.stdout
