"""`primerl`: one entry point; each subcommand is a capability that exists."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from plumbing.config import Config, load_config
from plumbing.runtime import run, setup_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, help="PrimeRL-ServeKit++: event-driven RL rollouts on Kafka, Redis and vLLM.")
infra_app = typer.Typer(no_args_is_help=True, help="Local broker and Redis.")
app.add_typer(infra_app, name="infra")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file")]
StateOpt = Annotated[Optional[Path], typer.Option("--state-dir", help="where infra state and logs live")]


def _cfg(config: Path | None, state_dir: Path | None = None, **overrides: object) -> Config:
    cfg = load_config(config, state_dir=state_dir, **overrides)
    setup_logging(cfg.log_level)
    return cfg


@infra_app.command("up")
def infra_up(config: ConfigOpt = None, state_dir: StateOpt = None) -> None:
    """Start a local broker and Redis where none is configured; create topics; print the env."""
    from plumbing.infra import ensure_infra

    cfg = _cfg(config, state_dir)
    state = run(ensure_infra(cfg))
    typer.echo(f"# servers ready; written to {cfg.state_dir / 'infra.env'} (other primerl commands read it)")
    for key, value in sorted(state.env.items()):
        typer.echo(f"export {key}={value}")


@infra_app.command("down")
def infra_down(config: ConfigOpt = None, state_dir: StateOpt = None) -> None:
    """Stop exactly the processes `infra up` started."""
    from plumbing.infra import teardown_infra

    stopped = teardown_infra(_cfg(config, state_dir))
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@infra_app.command("status")
def infra_status(config: ConfigOpt = None, state_dir: StateOpt = None) -> None:
    """Say what runs where."""
    from plumbing.local_servers import describe, read_state

    cfg = _cfg(config, state_dir)
    state = read_state(cfg.state_dir)
    if state is None:
        typer.echo(f"no local servers recorded in {cfg.state_dir}; configured: kafka={cfg.bootstrap or '-'} redis={cfg.redis_url or '-'}")
        raise typer.Exit(1)
    typer.echo(describe(state))


@app.command("up")
def up(
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
    prompts: Annotated[int, typer.Option(help="prompt requests to push through")] = 200,
    keep: Annotated[bool, typer.Option(help="leave the local servers running")] = False,
) -> None:
    """The main job: local servers, a batch of prompt requests through the broker, counts and timings."""
    from plumbing.infra import ensure_infra, teardown_infra
    from plumbing.local_servers import process_status, read_state
    from primerl.roundtrip import roundtrip

    cfg = _cfg(config, state_dir)
    earlier = read_state(cfg.state_dir)
    # Servers an earlier `infra up` left running belong to the user: leave them.
    owns_servers = earlier is None or not all(alive for _, alive in process_status(earlier))

    async def main() -> None:
        await ensure_infra(cfg)
        report = await roundtrip(cfg, prompts)
        typer.echo(
            f"published {report.published} prompt requests in {report.publish_s:.3f}s; "
            f"received {report.received}; latency p50 {report.latency_p50_ms:.1f} ms p95 {report.latency_p95_ms:.1f} ms; "
            f"total {report.total_s:.2f}s"
        )
        if report.received != report.published:
            raise typer.Exit(1)

    try:
        run(main())
    finally:
        if owns_servers and not keep:
            teardown_infra(cfg)


def main() -> None:
    """Console-script entry point."""
    app()
