"""The front door: the command line answers at once, and the package imports on every Python it promises."""
from __future__ import annotations

import subprocess
import sys

import pytest

from inva_pyro import config
from inva_pyro.errors import InputError

HEAVY = ("torch", "pyro", "arviz", "optuna", "bids", "nibabel", "nilearn", "monai", "pandas", "sklearn")
COMMANDS = ("simulate", "fit", "predict", "evaluate", "adapt", "latents", "manifest", "tune", "demo")


def _loaded_after(code: str) -> list[str]:
    """The heavy top-level packages a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return sorted(set(out.split()) & set(HEAVY))


def test_importing_the_command_line_loads_no_heavy_library():
    assert _loaded_after("import inva_pyro.cli") == []
    assert _loaded_after("import inva_pyro.cli_args; inva_pyro.cli_args.build_parser()") == []


def test_the_package_names_load_on_first_use():
    assert "torch" in _loaded_after("from inva_pyro import InVA")
    import inva_pyro
    assert inva_pyro.InVA.__name__ == "InVA" and "Cohort" in dir(inva_pyro)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        inva_pyro.Nope  # noqa: B018


@pytest.mark.parametrize("command", (None, *COMMANDS))
def test_every_help_prints_without_loading_the_model(command):
    argv = ["--help"] if command is None else [command, "--help"]
    probe = ("import sys\nfrom inva_pyro import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    assert e.code == 0, e.code\nprint('LOADED', ' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", probe, *argv], check=True, capture_output=True, text=True).stdout
    assert "usage: inva" in out
    loaded = set(out.rsplit("LOADED", 1)[1].split())
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_toml_reader_is_the_standard_one_or_its_backport():
    assert config.tomllib.__name__ == ("tomllib" if sys.version_info >= (3, 11) else "tomli")
    assert config.read_toml(b'name = "x"\n[model]\nhidden = 8\n', "p.toml") == {"name": "x", "model": {"hidden": 8}}
    with pytest.raises(InputError, match=r"^p\.toml: not valid TOML \(") as err:
        config.read_toml(b"[model\nhidden = 8\n", "p.toml")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="p.toml: not valid TOML"):
        config.read_toml(b"name = '\xff'\n", "p.toml")
