"""Composing the Hydra config outside ``@hydra.main`` (builders, tests) with the same overrides syntax."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from research_rl.config.schema import Config, ConfigError, load_config

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str] | None = None) -> Config:
    """Compose ``conf/config.yaml`` with Hydra overrides and return the validated ``Config``.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a failed cross-field check; the key is named.
    """
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides or []))
        return load_config(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(getattr(e, "full_key", None) or "override", str(e).splitlines()[0]) from e


def compose_from_argv(flags: set[str] = frozenset(), argv: list[str] | None = None) -> tuple[Config, set[str]]:
    """Split ``--flag`` arguments (from ``flags``) from Hydra overrides and compose; exits 2 on a config error."""
    argv = sys.argv[1:] if argv is None else argv
    given = {a for a in argv if a in flags}
    unknown = [a for a in argv if a.startswith("--") and a not in flags]
    if unknown:
        sys.exit(f"unknown option {unknown[0]}; options: {sorted(flags) or 'none'}; everything else is a Hydra override key=value")
    try:
        return compose_config([a for a in argv if a not in flags]), given
    except ConfigError as e:
        sys.exit(str(e))
