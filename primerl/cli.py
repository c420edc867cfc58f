"""`primerl`: one entry point; each subcommand is a capability that exists."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from operations.commands import register as register_operations
from plumbing.cli_options import ConfigOpt, StateOpt, command_config
from plumbing.runtime import run

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="PrimeRL-ServeKit++: event-driven RL rollouts on Kafka, Redis and vLLM.",
)
infra_app = typer.Typer(no_args_is_help=True, help="Local broker and Redis.")
app.add_typer(infra_app, name="infra")
keys_app = typer.Typer(no_args_is_help=True, help="Engine and verifier signing keys.")
app.add_typer(keys_app, name="keys")


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"primerl {version('primerl-servekit')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the installed version")
    ] = False,
) -> None:
    """PrimeRL-ServeKit++: event-driven RL rollouts on Kafka, Redis and vLLM."""


AuthOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--auth/--no-auth",
        help="local redis-server requires a generated ACL user (default: infra.auth, true); --no-auth: open",
    ),
]


@infra_app.command("up")
def infra_up(config: ConfigOpt = None, state_dir: StateOpt = None, auth: AuthOpt = None) -> None:
    """Start a local broker and Redis where none is configured; create topics; print the env."""
    from plumbing.infra import ensure_infra
    from plumbing.local_servers import credentials_file, read_credentials

    cfg = command_config(config, state_dir, **{"infra.auth": auth})
    state, cfg = run(ensure_infra(cfg))
    typer.echo(f"# servers ready; written to {cfg.state_dir / 'infra.env'} (other primerl commands read it)")
    creds = read_credentials(cfg.state_dir)
    if creds is not None and creds.redis_url == cfg.redis_url:
        typer.echo(
            f"# Redis requires ACL user {creds.redis_username!r}: password in {credentials_file(cfg.state_dir)} "
            "(0600, read by primerl commands with this --state-dir)"
        )
    if any(p.name == "kafka" for p in state.processes):
        typer.echo("# the local broker takes clients without credentials (loopback only; see README, Credentials)")
    for key, value in sorted(state.env.items()):
        typer.echo(f"export {key}={value}")


@infra_app.command("down")
def infra_down(config: ConfigOpt = None, state_dir: StateOpt = None) -> None:
    """Stop exactly the processes `infra up` started."""
    from plumbing.infra import teardown_infra

    stopped = teardown_infra(command_config(config, state_dir))
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@infra_app.command("status")
def infra_status(config: ConfigOpt = None, state_dir: StateOpt = None) -> None:
    """Say what runs where."""
    from plumbing.local_servers import describe, read_state
    from plumbing.security import redacted

    cfg = command_config(config, state_dir)
    state = read_state(cfg.state_dir)
    if state is None:
        typer.echo(
            f"no local servers recorded in {cfg.state_dir}; "
            f"configured: kafka={cfg.bootstrap or '-'} redis={redacted(cfg.redis_url) or '-'}"
        )
        raise typer.Exit(1)
    typer.echo(describe(state))


@app.command("up")
def up(
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
    steps: Annotated[
        int, typer.Option(help="learner steps (0: one batch through the engine, per-request figures)")
    ] = 15,
    prompts: Annotated[int, typer.Option(help="prompts per step (GRPO groups)")] = 8,
    group_size: Annotated[int, typer.Option(help="samples per prompt (G)")] = 4,
    max_tokens: Annotated[int, typer.Option(help="tokens per sample at most")] = 24,
    heldout: Annotated[int, typer.Option(help="held-out prompts for the accuracy")] = 32,
    eval_every: Annotated[int, typer.Option(help="evaluate every this many steps")] = 3,
    seed: Annotated[int, typer.Option(help="seed of the training prompts and the learner")] = 0,
    algo: Annotated[str, typer.Option(help="grpo or ppo")] = "grpo",
    task: Annotated[
        str, typer.Option(help="arithmetic (single turn), or a multi-turn environment: calculator, retrieval_qa")
    ] = "arithmetic",
    keep: Annotated[bool, typer.Option(help="leave the local servers running")] = False,
    auth: AuthOpt = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="show every library log here instead of in <state-dir>/logs")
    ] = False,
    out_dir: Annotated[Path, typer.Option(help="where the learning curve's CSV and plot go")] = Path("artifacts"),
) -> None:
    """The main job: local servers, engine, verifier and learner; a whole RL run on the built-in task.

    Shows the step table, the current wait and a summary; library logs go to
    <state-dir>/logs/up-<time>.log, each step to TensorBoard (<state-dir>/tensorboard/<run>).
    """
    from primerl.settings import RunSettings
    from primerl.up import run_up

    cfg = command_config(config, state_dir, **{"learner.seed": seed, "learner.algo": algo, "infra.auth": auth})
    settings = RunSettings(
        steps=steps,
        prompts_per_step=prompts,
        group_size=group_size,
        heldout=heldout,
        eval_every=eval_every,
        max_tokens=max_tokens,
        seed=seed,
        task=task,
    )
    from primerl.tasks import make_task

    try:
        title = f"{algo.upper()} on {make_task(settings).title} with SmolLM2-135M (CPU)"
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--task") from err
    suffix = ("" if algo == "grpo" else f"_{algo}") + ("" if task == "arithmetic" else f"_{task}")
    raise typer.Exit(run_up(cfg, settings, keep=keep, verbose=verbose, out_dir=out_dir, title=title, suffix=suffix))


@app.command("learner")
def learner(
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
    algo: Annotated[str, typer.Option(help="grpo or ppo")] = "grpo",
    run_id: Annotated[Optional[str], typer.Option(help="the run to learn from")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="/metrics port (0: any free)")] = None,
) -> None:
    """Run the learner of one run until SIGTERM (it checkpoints and resumes)."""
    from learners.service import serve_learner

    cfg = command_config(config, state_dir, run_id=run_id, **{"learner.algo": algo, "metrics.port": metrics_port})
    run(serve_learner(cfg))


@app.command("engine")
def engine(
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
    model: Annotated[Optional[str], typer.Option(help="HF model folder or id (default: bundled SmolLM2-135M)")] = None,
    max_in_flight: Annotated[Optional[int], typer.Option(help="requests in the engine at once")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="/metrics port (0: any free)")] = None,
    router: Annotated[
        Optional[bool], typer.Option("--router/--no-router", help="also run a router in this process")
    ] = None,
) -> None:
    """Run one engine worker in the `engine` consumer group until SIGTERM."""
    from plumbing.consumer import FatalError
    from primerl.serve import serve_engine

    cfg = command_config(
        config,
        state_dir,
        **{
            "engine.model": model,
            "engine.max_in_flight": max_in_flight,
            "metrics.port": metrics_port,
            "routing.embedded": router,
        },
    )
    try:
        run(serve_engine(cfg))
    except FatalError as err:
        typer.echo(f"engine worker stopped: {err}", err=True)
        raise typer.Exit(3) from err


@app.command("router")
def router(
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
    policy: Annotated[Optional[str], typer.Option(help="cache_aware, round_robin or hash")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="/metrics port (0: any free)")] = None,
) -> None:
    """Run one router (rollout.prompts -> rollout.routed) in the `router` group until SIGTERM."""
    from primerl.serve import serve_router

    cfg = command_config(config, state_dir, **{"routing.policy": policy, "metrics.port": metrics_port})
    run(serve_router(cfg))


@app.command("verifier")
def verifier(
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
    key_file: Annotated[
        Optional[Path], typer.Option(help="Ed25519 private key (default: <state-dir>/keys, generated once)")
    ] = None,
    remote_url: Annotated[Optional[str], typer.Option(help="URL of a remote HTTP verifier for task 'remote'")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="/metrics port (0: any free)")] = None,
) -> None:
    """Run one verifier worker in the `verifier` consumer group until SIGTERM."""
    from verifier_workers.service import serve_verifier

    cfg = command_config(
        config,
        state_dir,
        **{"verifier.key_file": key_file, "verifier.remote_url": remote_url, "metrics.port": metrics_port},
    )
    run(serve_verifier(cfg))


@app.command("envhub")
def envhub(
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
    corpus_url: Annotated[
        Optional[str], typer.Option(help="the browser's corpus server (default: start the bundled one)")
    ] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="/metrics port (0: any free)")] = None,
) -> None:
    """Run one env hub worker (multi-turn sessions: tools, next turns, trajectories) in group `envhub`."""
    from envhub.service import serve_envhub

    cfg = command_config(config, state_dir, **{"envhub.corpus_url": corpus_url, "metrics.port": metrics_port})
    run(serve_envhub(cfg))


Role = Annotated[
    str, typer.Option(help="engine (signs completions), verifier (signs rewards) or envhub (signs trajectories)")
]


def _keys_folder(role: str, out_dir: Path | None, config: Path | None, state_dir: Path | None) -> Path:
    if role not in ("engine", "verifier", "envhub"):
        raise typer.BadParameter(f"role must be engine, verifier or envhub, not {role!r}")
    if out_dir is not None:
        return out_dir
    cfg = command_config(config, state_dir)
    return {"engine": cfg.engine_keys_dir, "envhub": cfg.envhub_keys_dir}.get(role, cfg.keys_dir)


@keys_app.command("generate")
def keys_generate(
    role: Role = "verifier",
    out_dir: Annotated[
        Optional[Path],
        typer.Option(help="folder (default: <state-dir>/keys; engine and envhub keys in <state-dir>/keys/<role>)"),
    ] = None,
    key_id: Annotated[Optional[str], typer.Option(help="key id (default: <role>-<date>-<random>)")] = None,
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Write an Ed25519 key pair: <key-id>.key (mode 0600) and <key-id>.pub.

    Signers use the newest key of their folder without a .retired marker; checkers trust
    every .pub of the folder and re-read it when they meet a key id they do not know.
    """
    from plumbing.trust import generate_keypair

    priv, pub = generate_keypair(_keys_folder(role, out_dir, config, state_dir), key_id, role=role)
    typer.echo(f"private key: {priv} (0600)\npublic key:  {pub} (trusted by whoever reads this folder)")


@keys_app.command("list")
def keys_list(
    role: Role = "verifier",
    out_dir: Annotated[Optional[Path], typer.Option(help="folder (default: the role's under the state dir)")] = None,
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Every key of a folder: id, whether its private half is here, when it was made and retired."""
    import time

    from plumbing.trust import list_keys, newest_live_key

    folder = _keys_folder(role, out_dir, config, state_dir)
    keys = list_keys(folder) if folder.is_dir() else []
    if not keys:
        typer.echo(f"no {role} keys in {folder}")
        return
    signing = newest_live_key(folder)

    def when(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    for k in keys:
        state = "live" if k.retired_at is None else f"retired from {when(k.retired_at)}"
        mark = " (signs)" if signing is not None and signing.stem == k.key_id else ""
        typer.echo(
            f"{k.key_id}\tmade {when(k.created_at)}\t{'private+public' if k.has_private else 'public only'}\t"
            f"{state}{mark}"
        )


@keys_app.command("rotate")
def keys_rotate(
    role: Role = "verifier",
    grace_s: Annotated[
        Optional[float], typer.Option(help="old keys retire this long from now (default: custody.rotation_grace_s)")
    ] = None,
    key_id: Annotated[Optional[str], typer.Option(help="the new key's id (default: <role>-<date>-<random>)")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="folder (default: the role's under the state dir)")] = None,
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """A new key; every other live key retires after the grace. Restart (or scale) the signers within
    the grace: what they signed before the retirement stays valid, what they sign after is refused."""
    from plumbing.trust import rotate_keys

    cfg = command_config(config, state_dir)
    folder = _keys_folder(role, out_dir, config, state_dir)
    grace = cfg.custody.rotation_grace_s if grace_s is None else grace_s
    priv, retired = rotate_keys(folder, role, grace, key_id)
    typer.echo(f"new {role} key: {priv.stem} ({priv})")
    typer.echo(f"retiring in {grace:.0f}s: {', '.join(retired) if retired else 'none'}")


@keys_app.command("retire")
def keys_retire(
    key_id: Annotated[str, typer.Argument(help="the key to retire")],
    role: Role = "verifier",
    in_s: Annotated[float, typer.Option(help="retire this long from now (0: now)")] = 0.0,
    out_dir: Annotated[Optional[Path], typer.Option(help="folder (default: the role's under the state dir)")] = None,
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Refuse what `key_id` signs after the retirement time (signers stop choosing it; checkers
    re-read the marker when they next refresh their keyring, and on start)."""
    import time

    from plumbing.trust import retire_key

    folder = _keys_folder(role, out_dir, config, state_dir)
    try:
        at = retire_key(folder, key_id, time.time() + in_s)
    except FileNotFoundError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from err
    typer.echo(f"{key_id} retired from {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))}")


@app.command(
    "analyze-metrics",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def analyze_metrics(ctx: typer.Context) -> None:
    """The metrics guardrail: SLOs (TOML) against a scrape file or a Prometheus; exit 1 on a breach.

    Arguments as scripts/analyze_metrics.py (`primerl analyze-metrics --help`).
    """
    from operations.analyze_metrics import main as analyze

    raise typer.Exit(analyze(ctx.args))


@app.command("bench")
def bench(
    smoke: Annotated[bool, typer.Option(help="a few minutes: contexts 512,1024, 1 repeat, fewer sessions")] = False,
    contexts: Annotated[Optional[str], typer.Option(help="prompt sizes in tokens (default 512,...,8192)")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="repeats of every cell (default 2, smoke 1)")] = None,
    sessions: Annotated[Optional[int], typer.Option(help="multi-turn sessions per cell (default 4)")] = None,
    turns: Annotated[Optional[int], typer.Option(help="turns per session (default 4)")] = None,
    groups: Annotated[Optional[int], typer.Option(help="GRPO groups per cell (default 2)")] = None,
    group_size: Annotated[int, typer.Option(help="samples per group, sent as separate requests (G)")] = 8,
    max_tokens: Annotated[int, typer.Option(help="tokens per sample at most")] = 32,
    structured_share: Annotated[float, typer.Option(help="share of sessions and groups asking JSON")] = 0.5,
    kv_cache_gib: Annotated[int, typer.Option(help="KV cache per engine (GiB)")] = 1,
    block_size: Annotated[Optional[int], typer.Option(help="KV block of every engine (default: vLLM's, 128)")] = None,
    raw: Annotated[bool, typer.Option("--raw/--no-raw", help="also run the raw-engine upper bound")] = True,
    seed: Annotated[int, typer.Option(help="seed of the cells' text")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option(help="where the CSV, plot and scrape go")] = None,
) -> None:
    """Prime stack vs baseline vs raw engines over contexts (perf/bench_matrix.py); results in artifacts/."""
    import subprocess
    import sys

    # A child process, not an import: perf/ imports primerl/ (the run observer), and
    # scripts/check_imports.py refuses an import cycle between the two packages.
    argv = [sys.executable, "-m", "perf.bench_matrix", "--group-size", str(group_size), "--max-tokens", str(max_tokens)]
    argv += ["--structured-share", str(structured_share), "--kv-cache-gib", str(kv_cache_gib), "--seed", str(seed)]
    optional: dict[str, object] = {"--contexts": contexts, "--repeats": repeats, "--sessions": sessions}
    optional["--turns"] = turns
    optional |= {"--groups": groups, "--block-size": block_size, "--out-dir": out_dir}
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--smoke"] if smoke else []
    argv += [] if raw else ["--no-raw"]
    raise typer.Exit(subprocess.call(argv))


# publish, archive, replay, scale, status: the operations folder's commands.
register_operations(app)


def main() -> None:
    """Console-script entry point."""
    app()
