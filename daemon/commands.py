"""The daemon's commands: ``daemon``, ``apply``, ``revert``, ``export`` and ``demo``.

They are registered on the ``metake`` group in cli.py and get the StoreContext from it. Option
values are checked (DaemonSettings, the schedule) before anything is loaded or written, so a bad
value costs one line on stderr and nothing else. Torch and transformers are imported only by the
commands that load a model, so ``metake submit`` and friends stay quick to start.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from daemon.logs import LOG_FORMATS, configure_logging
from daemon.schedule import Every, Wakeups, parse_cron
from daemon.settings import (
    DEFAULT_MODEL,
    DTYPES,
    METHODS,
    DaemonSettings,
    HealthSettings,
    Retention,
    check_destination,
)
from daemon.stopping import Abandon, StopControl
from storage.checkpoints import check_exportable, choose_checkpoint
from storage.context import StoreContext
from storage.errors import InvalidInput
from storage.intake import check_submitter, login_name
from storage.leases import LeaseLost
from storage.models import DEFAULT_MODEL_NAME, MAX_ROW_ID, MODEL_NAME_ENV
from storage.reverts import request_revert

if TYPE_CHECKING:
    from daemon.runner import Daemon
    from daemon.service import PassReport

CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])


def name_option(function: CommandFunction) -> CommandFunction:
    """--name: which of the database's models (their corrections, lease and checkpoints)."""
    return click.option(
        "--name",
        default=DEFAULT_MODEL_NAME,
        envvar=MODEL_NAME_ENV,
        show_default=True,
        help=f"The served model's name: only corrections submitted with this --model are applied [${MODEL_NAME_ENV}].",
    )(function)


def model_options(function: CommandFunction) -> CommandFunction:
    """--model, --device, --dtype: which model, where, in what precision."""
    options = [
        click.option(
            "--model",
            default=DEFAULT_MODEL,
            show_default=True,
            help="'default' (the embedded SmolLM2-135M-Instruct), a Hugging Face model directory or a .gguf file.",
        ),
        click.option("--device", default=None, help="Torch device, e.g. cpu, cuda, cuda:1 [default: cuda if present]."),
        click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), function)


def edit_options(function: CommandFunction) -> CommandFunction:
    """How to edit and how to look after checkpoints, lease and health."""
    options = [
        click.option("--method", type=click.Choice(METHODS), default=None, help="Override the file's method."),
        click.option("--hparams", "hparams_file", type=click.Path(path_type=Path), help="Hyperparameter TOML file."),
        click.option("--batch-size", type=int, default=1, show_default=True, help="Corrections per edit."),
        click.option("--threads", type=int, default=None, help="Torch CPU threads [default: the cores it may use]."),
        click.option("--max-attempts", type=int, default=3, show_default=True, help="Tries before a correction fails."),
        click.option(
            "--gen-metrics/--no-gen-metrics",
            default=True,
            show_default=True,
            help="Record whether the model says each fact (greedy decoding) before and after its edit.",
        ),
        click.option("--keep-last", type=int, default=5, show_default=True, help="Keep the newest K checkpoints."),
        click.option("--keep-every", type=int, default=10, show_default=True, help="... and every M-th (0: none)."),
        click.option("--health-every", type=int, default=10, show_default=True, help="Health check every N batches."),
        click.option("--health-sample", type=int, default=20, show_default=True, help="Corrections re-tested."),
        click.option("--retention-warning", type=float, default=0.8, show_default=True, help="Warn below this."),
        click.option(
            "--room-warning",
            type=float,
            default=0.9,
            show_default=True,
            help="Warn when a layer has used more than this share of its room for edits.",
        ),
        click.option(
            "--rehearse/--no-rehearse",
            default=False,
            show_default=True,
            help="Queue again the re-tested corrections the model no longer says (source: rehearsal N of #id).",
        ),
        click.option("--max-rehearsals", type=int, default=3, show_default=True, help="... at most this often a fact."),
        click.option(
            "--drift-text",
            type=click.Path(path_type=Path),
            help="UTF-8 text for the perplexity drift check [default: a sample the base model wrote once].",
        ),
        click.option("--lease-seconds", type=float, default=60.0, show_default=True, help="Lease time to live."),
        click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True),
        click.option("--progress/--no-progress", default=None, help="Progress bar [default: when on a terminal]."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), name_option(model_options(function)))


def settings_from(options: dict[str, Any]) -> DaemonSettings:
    return DaemonSettings(
        name=options["name"],
        model=options["model"],
        device=options["device"],
        dtype=options["dtype"],
        method=options["method"],
        hparams_file=options["hparams_file"],
        batch_size=options["batch_size"],
        threads=options["threads"],
        max_attempts=options["max_attempts"],
        gen_metrics=options["gen_metrics"],
        lease_seconds=options["lease_seconds"],
        retention=Retention(options["keep_last"], options["keep_every"]),
        health=HealthSettings(
            every=options["health_every"],
            sample_size=options["health_sample"],
            retention_warning=options["retention_warning"],
            room_warning=options["room_warning"],
            drift_text=options["drift_text"],
            rehearse=options["rehearse"],
            max_rehearsals=options["max_rehearsals"],
        ),
    )


def _daemon_from(store: StoreContext, options: dict[str, Any]) -> Daemon:
    """The Daemon the options describe (checked first), logging as asked, with its own StopControl."""
    settings = settings_from(options)
    from daemon.runner import Daemon  # loads torch: imported here, see the module docstring

    logger = configure_logging(options["log_format"])
    return Daemon(store, settings, logger, StopControl(), progress=options["progress"])


def _summary(report: PassReport) -> str:
    applied = sum(len(b.applied) for b in report.batches)
    rejected = sum(len(b.rejected) for b in report.batches)
    failed = sum(len(b.failed) for b in report.batches)
    retried = report.corrections - applied - rejected - failed
    text = f"applied {applied} correction(s) in {len(report.batches)} batch(es)"
    text += f"; {rejected} rejected, {failed} failed, {retried} to retry"
    done = [r for r in report.reverts if r.refused is None]
    if report.reverts:
        text += f"; {len(done)} revert(s) performed, {len(report.reverts) - len(done)} refused"
    return text


@click.command()
@click.option("--interval", type=float, default=None, help="Poll the queue every SECONDS [default: 10].")
@click.option("--schedule", default=None, metavar="CRON", help="Apply pending ones at these times ('0 2 * * *').")
@click.option("--timezone", default=None, help="Time zone of --schedule [default: the local one].")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics on /metrics and liveness on /healthz at this port [default: off].",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port.")
@edit_options
@click.pass_obj
def daemon(
    store: StoreContext,
    interval: float | None,
    schedule: str | None,
    timezone: str | None,
    metrics_port: int | None,
    metrics_host: str,
    **options: Any,
) -> None:
    """Run until stopped: apply corrections as they arrive (or on a schedule), one writer per model.

    SIGTERM or Ctrl-C finishes the batch in flight and exits; a second one abandons it (its
    corrections go back to the queue).
    """
    if interval is not None and schedule is not None:
        raise click.UsageError("give --interval or --schedule, not both")
    if timezone is not None and schedule is None:
        raise click.UsageError("--timezone only applies to --schedule")
    if interval is not None and interval <= 0:
        raise click.UsageError(f"--interval must be positive, got {interval:g}")
    wakeups: Wakeups = parse_cron(schedule, timezone) if schedule is not None else Every(interval or 10.0)
    runner = _daemon_from(store, options)
    from daemon.service import serve

    if metrics_port is not None:
        try:
            port = runner.monitor.serve(metrics_host, metrics_port)
        except OSError as error:
            where = f"{metrics_host}:{metrics_port}"
            raise InvalidInput(f"cannot serve metrics on {where}: {error.strerror or error}") from error
        runner.log.info("metrics_serving", extra={"metake_fields": {"url": f"http://{metrics_host}:{port}/metrics"}})
    with runner.stop.handling_signals():
        try:
            serve(runner, wakeups)
        except Abandon:
            runner.log.info("stopped", extra={"metake_fields": {"batch": "abandoned"}})
        finally:
            runner.monitor.close()


@click.command()
@click.option("--max", "max_corrections", type=click.IntRange(min=1), default=None, help="Apply at most N corrections.")
@edit_options
@click.pass_obj
def apply(store: StoreContext, max_corrections: int | None, **options: Any) -> None:
    """Apply what is pending now (and perform pending reverts), then exit.

    The same code as the daemon, in the foreground; refused while a daemon holds the model.
    """
    runner = _daemon_from(store, options)
    from daemon.service import apply_pending

    with runner.stop.handling_signals():
        try:
            report = apply_pending(runner, max_corrections)
        except Abandon:
            click.echo("stopped: the batch in flight was abandoned and its corrections queued again", err=True)
            return
        except LeaseLost as error:
            raise click.ClickException(str(error)) from error
    click.echo(_summary(report))


@click.command()
@click.argument("checkpoint_id", type=click.IntRange(1, MAX_ROW_ID))
@click.option("--as", "requested_by", default=None, help="Name to record as requester [default: your login name].")
@click.pass_obj
def revert(store: StoreContext, checkpoint_id: int, requested_by: str | None) -> None:
    """Queue a revert of the model to CHECKPOINT_ID.

    The daemon (or the next `metake apply`) restores that checkpoint's weights and editor state
    exactly before its next batch, marks the corrections applied since as reverted (they can be
    submitted again) and records the result as a new checkpoint.
    """
    who = check_submitter(requested_by if requested_by is not None else login_name())
    with store.sessions().begin() as session:
        request = request_revert(session, checkpoint_id, who)
        request_id = request.id
    click.echo(request_id)
    click.echo(
        f"revert request {request_id} queued: back to checkpoint {checkpoint_id}; a running daemon performs it "
        "within seconds, otherwise run `metake apply`",
        err=True,
    )


@click.command()
@click.argument("checkpoint_id", type=click.IntRange(1, MAX_ROW_ID), required=False)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New directory to write the model to.")
@name_option
@model_options
@click.pass_obj
def export(
    store: StoreContext, checkpoint_id: int | None, out: Path, name: str, model: str, device: str | None, dtype: str
) -> None:
    """Write a checkpoint (default: the --name model's current one) as a Hugging Face model directory.

    The result loads with transformers' AutoModelForCausalLM.from_pretrained(DIR), no metake needed.
    """
    check_destination(out)  # before torch is imported (seconds), so a bad --out is refused at once
    from daemon.export import export_checkpoint  # loads torch: imported here
    from daemon.workspace import load_base_model

    settings = DaemonSettings(name=name, model=model, device=device or "cpu", dtype=dtype)
    sessions = store.sessions()
    with sessions() as session:
        check_exportable(session, checkpoint_id, name)
    loaded = load_base_model(settings, store.home)
    with sessions() as session:
        checkpoint = choose_checkpoint(session, checkpoint_id, name, loaded.identity)
    exported = export_checkpoint(store.home, checkpoint, loaded, out)
    click.echo(f"exported checkpoint {exported.checkpoint_id} to {exported.directory}")


@click.command()
@click.option(
    "--home",
    "demo_home",
    type=click.Path(path_type=Path),
    default=None,
    help="Home of the demo [default: the folder demo in the data home]; never an existing non-demo home.",
)
@click.option("--hparams", "hparams_file", type=click.Path(path_type=Path), help="Hyperparameter TOML file.")
@click.option("--method", type=click.Choice(METHODS), default=None, help="Override the hyperparameters' method.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True)
@model_options
@click.pass_obj
def demo(
    store: StoreContext,
    demo_home: Path | None,
    hparams_file: Path | None,
    method: str | None,
    log_format: str,
    model: str,
    device: str | None,
    dtype: str,
) -> None:
    """Correct three real CounterFact facts in the model with the daemon, then print the history.

    Runs in a home of its own (made afresh each time; cached models and statistics are kept):
    creates the database, submits the corrections, applies them one batch each with health
    checks, and prints each correction's metrics before and after.
    """
    settings = DaemonSettings(
        model=model,
        device=device,
        dtype=dtype,
        method=method,
        hparams_file=hparams_file,
        batch_size=1,
        health=HealthSettings(every=3),
    )
    root = demo_home or store.home.root / "demo"
    from daemon.demo import run_demo  # loads torch: imported here, see the module docstring

    logger = configure_logging(log_format)
    stop = StopControl()
    with stop.handling_signals():
        try:
            run_demo(root, settings, logger, stop)
        except Abandon:
            click.echo("demo stopped", err=True)


COMMANDS = (daemon, apply, revert, export, demo)
