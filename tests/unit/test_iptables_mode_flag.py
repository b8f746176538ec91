"""``kpy run --iptables-mode``: the same backend option as ``--backend-option
iptables_mode=``, kept beside the other backend options from file, environment or flags,
and what the iptables backend then drives."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from kpy_iptables import IptablesBackend

from kpy.agent import config as cfg
from kpy.cli import main


def _effective(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    result = CliRunner().invoke(
        main, ["run", "--backend", "iptables", *args, "--write-config-to", "-"], env=env
    )
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("mode", ["auto", "nft", "legacy"])
def test_flag_sets_the_backend_option(mode: str) -> None:
    assert _effective("--iptables-mode", mode)["backendOptions"] == {"iptables_mode": mode}


def test_flag_keeps_other_backend_options_and_wins(tmp_path: Path) -> None:
    file = tmp_path / "kpy.yaml"
    file.write_text("backendOptions: {iptables_mode: nft, other: x}\n", encoding="utf-8")
    data = _effective(
        "--config",
        str(file),
        "--iptables-mode",
        "legacy",
        env={"KPY_BACKEND_OPTIONS": "iptables_mode=nft,other=y"},
    )
    assert data["backendOptions"] == {"iptables_mode": "legacy", "other": "y"}
    data = _effective("--backend-option", "extra=1", "--iptables-mode", "nft")
    assert data["backendOptions"] == {"extra": "1", "iptables_mode": "nft"}


def test_without_the_flag_the_option_comes_from_elsewhere() -> None:
    data = _effective(env={"KPY_BACKEND_OPTIONS": "iptables_mode=legacy"})
    assert data["backendOptions"] == {"iptables_mode": "legacy"}


def test_an_unknown_mode_is_refused() -> None:
    result = CliRunner().invoke(main, ["run", "--iptables-mode", "xtables"])
    assert result.exit_code == 2
    assert "'xtables' is not one of 'auto', 'nft', 'legacy'" in result.output


def test_the_backend_drives_the_forced_flavour(tmp_path: Path) -> None:
    out = tmp_path / "effective.yaml"
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--backend",
            "iptables",
            "--iptables-mode",
            "legacy",
            "--write-config-to",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    config = cfg.resolve(out, {}, {})
    backend = IptablesBackend(config.backend_config())
    assert backend.mode == "legacy"  # forced: no detection ran
    assert backend._kernel.forced == "legacy"
