"""Reading a TOML (``.toml``) or JSON (``.json``) table of settings: the one parser for config files
(command-line ``--config`` and :meth:`pyro_vits.train.FitConfig.from_file`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomllib

__all__ = ["load_config_file"]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON (``.json``) file of ``option = value`` pairs."""
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"config file {path} must end in .toml or .json")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except ValueError as err:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"config file {path} is not valid {path.suffix[1:].upper()}: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a table of option = value, "
                         f"got {type(values).__name__}")
    return values
