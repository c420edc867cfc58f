"""The operations subcommands of `primerl`: publish, archive, replay, scale, status.

`register(app)` adds them to the main typer app (primerl/cli.py), so the operations
code stays in this folder and the main CLI module changes by two lines.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Annotated, Optional

import typer
from prometheus_client import CollectorRegistry

from plumbing.cli_options import ConfigOpt, StateOpt, command_config, require_servers
from plumbing.config import Config
from plumbing.runtime import run


def _metrics(cfg: Config) -> CollectorRegistry:
    """A registry served on /metrics for this command's lifetime (every process serves one)."""
    from plumbing.metrics import serve_metrics

    registry = CollectorRegistry()
    serve_metrics(cfg.metrics, registry)
    return registry


def publish(
    file: Annotated[
        Path,
        typer.Argument(
            help="prompt file (.jsonl, .parquet, .csv), or a Hugging Face dataset: a saved dataset folder, "
            "a folder of data files, an .arrow file",
            exists=True,
        ),
    ],
    run_id: Annotated[Optional[str], typer.Option(help="run id of every request (default: run-<random>)")] = None,
    group_size: Annotated[int, typer.Option(help="GRPO fan-out: samples per prompt (rows may override)")] = 1,
    task: Annotated[str, typer.Option(help="reward function for rows that name none")] = "none",
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 1.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling")] = 1.0,
    top_k: Annotated[int, typer.Option(help="top-k sampling (-1: off)")] = -1,
    max_tokens: Annotated[int, typer.Option(help="tokens per sample at most")] = 128,
    stop: Annotated[Optional[list[str]], typer.Option(help="stop string (repeatable)")] = None,
    grammar_kind: Annotated[
        Optional[str], typer.Option(help="default output grammar kind (regex, json_schema, choice, ...)")
    ] = None,
    grammar_spec: Annotated[str, typer.Option(help="the default grammar's spec")] = "",
    system_prompt: Annotated[
        Optional[str], typer.Option(help="system turn prepended to chat rows that have none")
    ] = None,
    rate: Annotated[float, typer.Option(help="requests per second at most (0: as fast as the broker acks)")] = 0.0,
    strict: Annotated[
        bool, typer.Option(help="stop at the first bad row instead of reporting it and going on")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="validate and report, publish nothing")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    prompt_column: Annotated[Optional[str], typer.Option(help="the column holding the plain prompt")] = None,
    answer_column: Annotated[Optional[str], typer.Option(help="the column holding the reference answer")] = None,
    messages_column: Annotated[Optional[str], typer.Option(help="the column holding the chat turns")] = None,
    split: Annotated[Optional[str], typer.Option(help="a dataset's split (default: its only one, or train)")] = None,
    preset: Annotated[
        Optional[str], typer.Option(help="a known dataset shape: gsm8k (question/answer columns, task math)")
    ] = None,
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Publish a prompt batch to rollout.prompts; bad rows are reported with their line number.

    Exit status 0: every row published; 2: some rows were bad (the good ones were published);
    1: nothing could be published.
    """
    from producers.datasets_input import PRESETS, ColumnMap
    from producers.prompt_files import BadRow, FileDefaults, read_prompt_file
    from producers.publish import publish_requests
    from schemas import Grammar, GrammarKind, SamplingParams

    cfg = command_config(config, state_dir)
    columns = ColumnMap(prompt=prompt_column, answer=answer_column, messages=messages_column)
    if preset is not None:
        if preset not in PRESETS:
            raise typer.BadParameter(f"--preset: one of {sorted(PRESETS)}, not {preset!r}")
        shape = PRESETS[preset]
        # Explicit column flags win over the preset's.
        columns = ColumnMap(
            prompt=prompt_column or shape.columns.prompt,
            answer=answer_column or shape.columns.answer,
            messages=messages_column or shape.columns.messages,
            prompt_as_chat=shape.columns.prompt_as_chat,
        )
        task = shape.task if task == "none" else task
    try:
        grammar = Grammar(GrammarKind(grammar_kind), grammar_spec) if grammar_kind else None
    except ValueError as err:
        raise typer.BadParameter(f"--grammar-kind: {err}") from err
    defaults = FileDefaults(
        run_id=run_id or f"run-{uuid.uuid4().hex[:8]}",
        task=task,
        group_size=group_size,
        sampling=SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, stop=stop or []
        ),
        grammar=grammar,
        system_prompt=system_prompt,
    )
    try:
        requests, errors = read_prompt_file(file, defaults, strict=strict, columns=columns, split=split)
    except BadRow as err:
        typer.echo(f"error: {err} (--strict: nothing published)", err=True)
        raise typer.Exit(1) from err
    except ValueError as err:  # the input itself (a missing split, `datasets` not installed)
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    for e in errors:
        typer.echo(f"{file}:{e.line}: skipped: {e.reason}", err=True)
    if not requests:
        typer.echo(f"no valid rows in {file} ({len(errors)} bad)", err=True)
        raise typer.Exit(1)
    if dry_run:
        typer.echo(
            f"dry run: {len(requests)} valid rows ({sum(r.group_size for r in requests)} samples), {len(errors)} bad; "
            f"run {defaults.run_id}"
        )
        raise typer.Exit(2 if errors else 0)
    report = run(
        publish_requests(cfg, requests, rate=rate, progress=progress and sys.stderr.isatty(), registry=_metrics(cfg))
    )
    typer.echo(
        f"published {report.requests} requests ({report.samples} samples) of run {report.run_id} to {report.topic} "
        f"in {report.seconds:.2f}s ({report.rate:.0f} req/s); {len(errors)} bad rows skipped"
    )
    typer.echo(f"  tasks: {report.per_task}  partitions: {report.partitions}  first ids: {report.first_ids}")
    raise typer.Exit(2 if errors else 0)


def archive(
    root: Annotated[Optional[Path], typer.Option(help="run-log folder (default: artifacts/runs)")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="/metrics port (0: any free)")] = None,
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Run the archiver (consumer group `archiver`) until SIGTERM: every record -> <root>/<run_id>/<topic>/*.parquet."""
    from archiver.archiver import serve_archiver

    cfg = command_config(config, state_dir, **{"archive.root": root, "metrics.port": metrics_port})
    run(serve_archiver(cfg))


def replay(
    run_id: Annotated[str, typer.Argument(help="the archived run to replay")],
    stage: Annotated[str, typer.Option(help="prompts | verifier | learner")] = "verifier",
    new_run_id: Annotated[
        Optional[str], typer.Option(help="run id of the replay (default: <run>-replay-<random>)")
    ] = None,
    root: Annotated[Optional[Path], typer.Option(help="run-log folder (default: artifacts/runs)")] = None,
    task: Annotated[
        Optional[str],
        typer.Option(help="verifier: score with this task's reward function instead of each completion's own"),
    ] = None,
    verifier_version: Annotated[
        Optional[str], typer.Option(help="use only the recorded rewards of this verifier version")
    ] = None,
    rescored: Annotated[
        bool, typer.Option(help="learner: train on a verifier replay's scores (run it first, same --new-run-id)")
    ] = False,
    rate: Annotated[float, typer.Option(help="prompts: requests per second at most (0: no limit)")] = 0.0,
    seed: Annotated[Optional[int], typer.Option(help="learner: seed (default: the learner config's)")] = None,
    groups_per_step: Annotated[
        Optional[int], typer.Option(help="learner: groups per update (default: the learner config's)")
    ] = None,
    model: Annotated[
        Optional[str], typer.Option(help="learner: starting weights (default: the engine config's model)")
    ] = None,
    save_policies: Annotated[
        bool, typer.Option(help="learner: write each step's safetensors folder and its file checksum")
    ] = False,
    threads: Annotated[
        Optional[int],
        typer.Option(help="learner: torch threads (default: the live learner's, when its steps are replayed, else 1)"),
    ] = None,
    outcomes: Annotated[
        Optional[Path],
        typer.Option(
            help="learner: the live learner's outcome log, whose steps are replayed exactly "
            "(default: <run log>/outcomes.jsonl, else <state dir>/learner/<run>/outcomes.jsonl)"
        ),
    ] = None,
    recorded_steps: Annotated[
        bool, typer.Option(help="learner: replay the live learner's recorded steps when found (else assemble groups)")
    ] = True,
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Re-drive one stage of an archived run into a new run id and report the difference."""
    from operations.replay import (
        RunLog,
        replay_learner,
        replay_prompts,
        rescore,
        save_learner_replay,
        save_rescored,
        verifier_diff,
    )

    if stage not in ("prompts", "verifier", "learner"):
        raise typer.BadParameter("--stage must be prompts, verifier or learner")
    cfg = command_config(config, state_dir)
    root = root or cfg.archive.root
    new_run = new_run_id or f"{run_id}-replay-{uuid.uuid4().hex[:6]}"
    try:
        log_ = RunLog(root, run_id)
    except FileNotFoundError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from err
    if stage == "prompts":
        report = run(
            replay_prompts(cfg, log_, new_run, rate=rate, progress=sys.stderr.isatty(), registry=_metrics(cfg))
        )
        typer.echo(
            f"replayed {report.requests} prompt requests ({report.samples} samples) of {run_id} as run {new_run} "
            f"in {report.seconds:.2f}s; ids derived from ({new_run}, original id)"
        )
        return
    if stage == "verifier":
        rows = run(rescore(log_, task=task, verifier_version=verifier_version))
        diff = verifier_diff(rows)
        out = save_rescored(root, new_run, rows, diff, run_id)
        typer.echo(
            f"re-scored {len(rows)} completions of {run_id} "
            f"(run {new_run}; per completion: {out}/replay_verifier.parquet)"
        )
        typer.echo(
            f"{'original verifier':40s} {'replay verifier':28s} {'n':>5s} {'orig mean':>9s} {'new mean':>9s} "
            f"{'changed':>7s} {'status chg':>10s} {'max |d|':>7s}"
        )
        for d in diff:
            typer.echo(
                f"{d.original_verifier[:40]:40s} {d.replay_verifier[:28]:28s} {d.completions:5d} "
                f"{d.original_mean:9.4f} {d.replay_mean:9.4f} {d.changed:7d} {d.status_changed:10d} "
                f"{d.max_abs_diff:7.4f}"
            )
        return
    from plumbing.run_log import run_dir_name
    from schemas import RewardStatus

    cfg = cfg.derive(
        **{
            k: v
            for k, v in {
                "learner.seed": seed,
                "learner.groups_per_step": groups_per_step,
                "engine.model": model,
            }.items()
            if v is not None
        }
    )
    scores = None
    if rescored:
        import pyarrow.parquet as pq

        path = root / run_dir_name(new_run) / "replay_verifier.parquet"
        if not path.exists():
            raise typer.BadParameter(f"--rescored: {path} missing; run --stage verifier --new-run-id {new_run} first")
        scores = {
            r["completion_id"]: (r["replay_scalar"], RewardStatus(r["replay_status"]))
            for r in pq.read_table(path).to_pylist()
            if r["replay_scalar"] is not None
        }
    save_dir = (root / run_dir_name(new_run) / "policies") if save_policies else None
    if outcomes is not None and not outcomes.is_file():
        raise typer.BadParameter(f"--outcomes: {outcomes} is not a file")
    result = replay_learner(
        cfg,
        log_,
        new_run,
        rewards=scores,
        verifier_version=verifier_version,
        save_dir=save_dir,
        registry=_metrics(cfg),
        progress=sys.stderr.isatty(),
        threads=threads,
        step_list=outcomes,
        use_step_list=recorded_steps,
    )
    path = save_learner_replay(root, result)
    if result.mode == "recorded_steps":
        typer.echo(
            f"learner replay of {run_id} as {new_run}: the live learner's {len(result.steps)} updates "
            f"from {result.step_list} "
            f"({result.groups_total} groups, {result.samples_missing} samples missing from the run log, "
            f"{result.steps_mismatched} steps whose update differs), seed {result.seed}, "
            f"{result.threads} torch thread(s), {result.wall_s:.1f}s"
        )
    else:
        typer.echo(
            f"learner replay of {run_id} as {new_run}: {result.groups_total} complete groups "
            f"({result.groups_incomplete} incomplete, "
            f"{result.samples_without_reward} completions without reward, "
            f"{result.stale_dropped} stale samples dropped), "
            f"seed {result.seed}, {result.threads} torch thread(s), {result.groups_per_step} groups/step, "
            f"{result.wall_s:.1f}s"
        )
    for s in result.steps:
        typer.echo(
            f"  step {s.step}: {s.groups} groups {s.samples} samples reward {s.reward_mean:.3f} loss {s.loss:.6f} "
            f"weights sha256 {s.weights_sha256}"
        )
    typer.echo(f"final weights sha256 (tensors): {result.final_sha256}")
    for version, checksum in sorted(result.original_checksums.items()):
        mine = result.replay_file_checksums.get(version)
        verdict = "" if mine is None else ("  SAME" if mine == checksum else f"  replay {mine[:16]}: DIFFERENT")
        typer.echo(f"  original policy v{version} file sha256 {checksum[:16]}{verdict}")
    typer.echo(f"report: {path}")


def scale(
    kind: Annotated[str, typer.Argument(help="engine | verifier | learner")],
    count: Annotated[int, typer.Argument(help="how many should run (0 stops them all)")],
    run_id: Annotated[Optional[str], typer.Option(help="learner: the run it learns from")] = None,
    wait: Annotated[bool, typer.Option(help="wait until new workers have joined their group")] = True,
    start_timeout: Annotated[float, typer.Option(help="seconds a new worker may take to serve")] = 240.0,
    stop_timeout: Annotated[
        float, typer.Option(help="seconds a stopped worker may take to finish its in-flight work")
    ] = 120.0,
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Start or stop local `primerl KIND` workers (own process groups, recorded in <state-dir>/workers.json)."""
    from operations.scale import read_workers
    from operations.scale import scale as do_scale

    cfg = command_config(config, state_dir)
    require_servers(cfg)
    try:
        result = do_scale(
            cfg, kind, count, run_id=run_id or "", wait=wait, start_timeout_s=start_timeout, stop_timeout_s=stop_timeout
        )
    except (ValueError, RuntimeError, TimeoutError) as err:
        typer.echo(f"scale {kind} {count}: {err}", err=True)
        raise typer.Exit(1) from err
    for w in result.started:
        typer.echo(f"started {w.role} pid {w.pid} (metrics :{w.metrics_port}, log {w.log_file})")
    for w, code in result.stopped:
        typer.echo(f"stopped {w.role} pid {w.pid} (exit {code if code is not None else '?'})")
    typer.echo(f"{kind}: {len(result.running)} running; all local workers:")
    for w in read_workers(cfg.state_dir):
        typer.echo(f"  {w.role:8s} pid {w.pid:<7d} metrics :{w.metrics_port:<5d} {w.run_id}")


def status(
    all_groups: Annotated[
        bool, typer.Option("--all", help="every consumer group, not only the workers' and the archiver's")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Consumer groups (members, partitions, lag), live workers, dead letters, cache hit rate, policy versions."""
    from operations.scale import read_workers
    from operations.status import collect_status, render, to_json
    from plumbing.redis_client import connect_redis

    cfg = command_config(config, state_dir)
    require_servers(cfg)

    async def main():
        redis = connect_redis(cfg)
        try:
            return await collect_status(cfg, redis, all_groups)
        finally:
            await redis.aclose()

    report = run(main())
    if as_json:
        typer.echo(to_json(report))
        return
    typer.echo(render(report), nl=False)
    local = read_workers(cfg.state_dir)
    if local:
        typer.echo("local worker processes (primerl scale): " + ", ".join(f"{w.role} pid {w.pid}" for w in local))


def tail(
    topic: Annotated[str, typer.Argument(help="topic name, e.g. rollout.completions or rollout.dlq")],
    run_id: Annotated[Optional[str], typer.Option(help="only this run's messages")] = None,
    from_beginning: Annotated[bool, typer.Option(help="the whole topic, not only what arrives from now on")] = False,
    follow: Annotated[bool, typer.Option(help="keep waiting for new records (Ctrl-C stops)")] = False,
    idle_s: Annotated[float, typer.Option(help="without --follow: stop after this long without a record")] = 3.0,
    max_records: Annotated[Optional[int], typer.Option(help="stop after this many lines")] = None,
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Print a topic's records as JSON lines, decoded with the schemas (dead letters with their original).

    A record that does not decode is printed as a line with `error`, `size` and `head` (base64).
    """
    from operations.tail import TailOptions
    from operations.tail import tail as tail_topic
    from schemas.topics import TOPICS

    if topic not in TOPICS:
        raise typer.BadParameter(f"unknown topic {topic!r}; known: {', '.join(sorted(TOPICS))}")
    cfg = command_config(config, state_dir)
    require_servers(cfg)
    out = sys.stdout.buffer

    def emit(line: bytes) -> None:
        out.write(line + b"\n")
        out.flush()

    opts = TailOptions(
        run_id=run_id, from_beginning=from_beginning, follow=follow, idle_s=idle_s, max_records=max_records
    )
    try:
        run(tail_topic(cfg, topic, opts, emit))
    except (BrokenPipeError, KeyboardInterrupt):  # `| head`, Ctrl-C: a normal end for a tail
        pass


def register(app: typer.Typer) -> None:
    """Add the operations subcommands to `app`."""
    app.command("publish")(publish)
    app.command("archive")(archive)
    app.command("replay")(replay)
    app.command("scale")(scale)
    app.command("status")(status)
    app.command("tail")(tail)
