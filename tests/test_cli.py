"""The command line's contract: version, defaults in the help, checked ports and addresses, a
missing optional package named in one line, and an install whose core carries no plotting,
simulation or code generation."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

from fc_edge import __version__
from fc_edge.cli import check_address, main

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fc-edge {__version__}"


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: rotated)", "(default: 64)", "(default: 1; a bundle's own)",
                    "(default: smollm2-135m; not with --engine)", "(default: auto)",
                    "(default: 3)", "(default: 0.0)"):
        assert default in text, default


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--port", "99999"], "port 99999 is outside 0..65535"),
    (["serve", "--port", "-5"], "port -5 is outside 0..65535"),
    (["serve", "--port", "x"], "not a port number"),
    (["generate", "--server", "127.0.0.1", "--prompt", "hi"], "is not HOST:PORT"),
    (["generate", "--server", "127.0.0.1:0", "--prompt", "hi"], "outside 1..65535"),
    (["generate", "--server", "a:1,b:70000", "--prompt", "hi"], "port 70000"),
])
def test_ports_and_addresses_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "edge.example:1", "[::1]:50051",
                                    "dns:///edge.example:50051", "ipv4:10.0.0.1:5,10.0.0.2:5",
                                    "unix:/tmp/fc-edge.sock"])
def test_good_addresses(target):
    assert check_address(target) == target


def test_a_missing_extra_is_one_line(monkeypatch, capsys):
    """A verb whose module needs an uninstalled package stands in with a one-line refusal
    naming the extra; so does one whose work imports it lazily."""
    real = importlib.import_module

    def without_simpy(name, *args):
        if name == "fc_edge.profile.commands":
            raise ModuleNotFoundError("No module named 'simpy'", name="simpy")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_simpy)
    assert main(["profile", "--anything"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fc-edge profile: error: this needs the simpy package, which is not "
                   "installed: pip install 'fc-edge[profile]'"]
    monkeypatch.setattr(importlib, "import_module", real)

    import fc_edge.codecs.commands as codecs_commands

    def needs_matplotlib(args):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(codecs_commands, "_list", needs_matplotlib)
    assert main(["codecs"]) == 1
    assert capsys.readouterr().err.strip() == (
        "fc-edge codecs: error: this needs the matplotlib package, which is not installed: "
        "pip install 'fc-edge[plots]'")


def test_the_core_install_is_the_device():
    """What the device runs, no more: plotting, simulation, code generation, the eval and the
    server stacks are extras, and `make install` still installs every extra the tests need."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower()
            for d in project["dependencies"]}
    elsewhere = {"matplotlib", "simpy", "grpcio-tools", "lm-eval", "ray", "scipy",
                 "statsmodels", "onnx", "onnxscript", "accelerate", "grpcio-health-checking",
                 "cupy-cuda12x"}
    assert not core & elsewhere
    assert {"torch", "numpy", "safetensors", "transformers", "grpcio", "protobuf", "numba"} <= core
    extras = project["optional-dependencies"]
    in_extras = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower()
                 for deps in extras.values() for d in deps}
    assert elsewhere <= in_extras
    assert extras["device"] == ["onnxruntime>=1.18"]
    makefile = (REPO / "Makefile").read_text()
    installed = makefile.split('install -e ".[')[1].split("]")[0].split(",")
    assert set(installed) >= {"dev", "device", "server", "engine", "plots", "profile", "eval",
                              "fleet"}


def test_one_split_layer_default():
    from fc_edge.models.defaults import DEFAULT_SPLIT_LAYER
    from fc_edge.runtime.server import default_split_layer

    assert default_split_layer(None) == DEFAULT_SPLIT_LAYER == 1
