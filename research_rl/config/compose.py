"""Composing the Hydra config outside ``@hydra.main`` (builders, tests) with the same overrides syntax, and the
check of override keys every entry point runs first (``check_overrides``, ``exit_on_bad_overrides``): an unknown
key or experiment fails with the schema's closest keys ("did you mean ...") before Hydra composes anything."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from research_rl.config.schema import Config, ConfigError, load_config, schema_keys, unknown_key

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Hydra's command-line options that take a value (the next argument is not an override)
HYDRA_VALUE_OPTIONS = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-c", "--cfg", "-p",
                       "--package", "--info", "--experimental-rerun"}


def experiments() -> list[str]:
    """The experiment names: ``conf/experiment/<name>.yaml``."""
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def override_key(override: str) -> str:
    """The config key an override sets (``+learner.lr=1`` -> ``learner.lr``; ``~key`` -> ``key``)."""
    return override.split("=", 1)[0].lstrip("+~")


def check_overrides(overrides: list[str]) -> None:
    """Every override names a schema key, a config group (``experiment``, ``hydra/...``) or a ``hydra.*`` setting,
    and ``experiment=NAME`` names a file of ``conf/experiment``.

    Raises:
        ConfigError: at the unknown key, with the closest schema keys (``schema.suggest_keys``), or at
            ``experiment`` with the closest experiment names.
    """
    import difflib

    known = set(schema_keys())
    for o in overrides:
        key = override_key(o)
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or "/" in key:
            continue
        if key == "experiment":
            names, value = experiments(), o.split("=", 1)[1] if "=" in o else ""
            for name in value.split(","):  # a multirun sweep lists several
                if name and name != "null" and name not in names:
                    close = difflib.get_close_matches(name, names, n=2, cutoff=0.6)
                    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
                    raise ConfigError("experiment", f"no experiment {name!r} in {CONF_DIR / 'experiment'}{hint} "
                                      f"(experiments: {names})")
            continue
        if key not in known:
            raise unknown_key(key)


def exit_on_bad_overrides(argv: list[str] | None = None) -> None:
    """For a ``@hydra.main`` entry point, before Hydra parses ``argv`` (default ``sys.argv[1:]``): exit with
    ``check_overrides``' one-line message when an override names an unknown key or experiment. Hydra's own options
    (``-m``, ``--cfg job``, ``-cn NAME``, ...) are skipped."""
    argv = sys.argv[1:] if argv is None else argv
    overrides, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in HYDRA_VALUE_OPTIONS
        elif "=" in a or a.startswith("~"):
            overrides.append(a)
    try:
        check_overrides(overrides)
    except ConfigError as e:
        sys.exit(str(e))


def compose_config(overrides: list[str] | None = None) -> Config:
    """Compose ``conf/config.yaml`` with Hydra overrides and return the validated ``Config``.

    Raises:
        ConfigError: an unknown key (with the closest schema keys), a value of the wrong type, or a failed
            cross-field check; the key is named.
    """
    overrides = list(overrides or [])
    check_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        return load_config(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(failed_key(e), str(e).splitlines()[0]) from e


def failed_key(e: Exception) -> str:
    """The config key a Hydra or OmegaConf error is about: its ``full_key``, else the key of the override Hydra
    names ("Could not override 'learner.lr'"), else ``"overrides"``. A Hydra override error keeps OmegaConf's
    error, with the key, as its cause."""
    for err in (e, e.__cause__):
        key = getattr(err, "full_key", None)
        if key:
            return str(key)
    import re

    m = re.search(r"override '([^']+)'", str(e))
    return m.group(1) if m else "overrides"


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
