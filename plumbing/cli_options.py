"""What every `primerl` command shares: the config options and how they become a Config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError

from plumbing.config import Config, load_config
from plumbing.runtime import setup_logging

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file")]
StateOpt = Annotated[
    Optional[Path], typer.Option("--state-dir", help="where infra state, worker records and logs live")
]


def command_config(config: Path | None, state_dir: Path | None = None, **overrides: object) -> Config:
    """The process's Config from the command's options (dotted names reach into sections); sets up logging.

    A value the config refuses (a choice it does not know, a number out of bounds) is a
    usage error naming the field, checked once, by the config's own types.
    """
    try:
        cfg = load_config(config, state_dir=state_dir, **overrides)
    except ValidationError as err:
        raise typer.BadParameter(str(err)) from err
    setup_logging(cfg.log_level)
    return cfg


def require_servers(cfg: Config) -> None:
    """Exit 1 with a hint when no broker or Redis is configured."""
    if not cfg.bootstrap or not cfg.redis_url:
        typer.echo(
            "no broker/Redis configured: run `primerl infra up` or set KAFKA_BOOTSTRAP_SERVERS and REDIS_URL", err=True
        )
        raise typer.Exit(1)
