"""The ``metake`` command line: submit corrections, inspect the queue and history, check the audit log.

The group puts a :class:`storage.context.StoreContext` in ``ctx.obj``. Commands that live in
other modules (the daemon's ``apply``, ``daemon``, ``revert``, ``export``, ``bench``) take it with
``@click.pass_obj`` and are registered at the bottom of this file with ``main.add_command``.
Every command except ``init`` and ``db upgrade`` opens the store through
``StoreContext.sessions()``, which refuses a database whose schema is not current.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import sqlalchemy.exc

from daemon.commands import COMMANDS
from evaluation.commands import bench
from storage.audit import ChainBreak, ChainHead, chain_head, check_head, event_count, sealed_from, verify_chain
from storage.audit_key import KEY_BYTES, write_new_audit_key
from storage.audit_rows import verify_rows
from storage.busy import running_import
from storage.checkpoints import all_checkpoints, model_checkpoints
from storage.context import StoreContext
from storage.db import current_revisions, damage_report, database_error_message, is_busy
from storage.errors import InvalidInput, UserError
from storage.imports import import_corrections
from storage.intake import (
    CorrectionInput,
    ParsedFile,
    check_model_name,
    check_submitter,
    login_name,
    make_correction,
    parse_corrections_text,
    parse_neighbor_option,
    read_corrections_file,
)
from storage.models import DEFAULT_MODEL_NAME, MAX_ROW_ID, MODEL_NAME_ENV, AuditEvent, Correction, CorrectionStatus
from storage.queries import (
    CorrectionStory,
    correction_history,
    correction_story,
    metrics_by_correction,
    queued_corrections,
)
from storage.queue import submit_many
from storage.report_data import report_data
from storage.serialize import (
    checkpoint_to_dict,
    correction_to_dict,
    edit_to_dict,
    event_to_dict,
    iso,
    metric_to_dict,
)
from storage.status import Status, gather_status

CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])
STATUS_CHOICE = click.Choice([status.value for status in CorrectionStatus], case_sensitive=False)
CELL_MAX_CHARS = 48
IMPORT_ONLY_STATUSES = frozenset({CorrectionStatus.STAGED.value, CorrectionStatus.ABANDONED.value})
"""Statuses only a chunked import gives; the status line shows them only when some exist."""


class OneLineUsageError(click.ClickException):
    """A usage error shown as its one-line message (click's usual form adds two lines of usage)."""

    exit_code = 2


class MetakeGroup(click.Group):
    """A click group that reports user errors as one line on stderr: UserError exits 1, usage 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as error:
            raise click.ClickException(str(error)) from error
        except click.UsageError as error:
            raise OneLineUsageError(error.format_message()) from error
        except sqlalchemy.exc.DBAPIError as error:  # busy or damaged: one line, not a traceback
            store = ctx.obj if isinstance(ctx.obj, StoreContext) else None
            holder = running_import(store.engine()) if store is not None and is_busy(error) else None
            raise click.ClickException(database_error_message(error, holder)) from error


class Umask(click.ParamType):
    """An octal file mode mask such as 077 or 0022."""

    name = "OCTAL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            mask = int(str(value), 8)
        except ValueError:
            mask = -1
        if not 0 <= mask <= 0o777:
            self.fail(f"{value!r} is not an octal mask between 000 and 777", param, ctx)
        return mask


class IsoTime(click.ParamType):
    """An ISO 8601 date or time; without a zone it is taken as UTC."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date or time (e.g. 2025-01-31 or 2025-01-31T14:00)", param, ctx)
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class ModelName(click.ParamType):
    """A model's name as ``storage.intake.check_model_name`` accepts it."""

    name = "NAME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_model_name(value)
        except InvalidInput as error:
            self.fail(str(error), param, ctx)


def model_filter(function: CommandFunction) -> CommandFunction:
    """--model NAME on the reading commands: only that model's corrections [default: every model's]."""
    return click.option(
        "--model", "model_name", type=ModelName(), default=None, help="Only this model's [default: every model's]."
    )(function)


def json_option(function: CommandFunction) -> CommandFunction:
    return click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects instead of a table.")(
        function
    )


def print_json(rows: list[dict[str, Any]]) -> None:
    click.echo(json.dumps(rows, indent=2, ensure_ascii=False))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Left-aligned columns; long cells are cut with an ellipsis, control characters escaped."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]
    for row in [list(headers), *cells]:
        click.echo("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= CELL_MAX_CHARS else text[: CELL_MAX_CHARS - 1] + "…"


def _minute(at: datetime | None) -> str:
    return "" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


@click.group(cls=MetakeGroup)
@click.option(
    "--home",
    metavar="DIR",
    help="Data home for the database, models, statistics and checkpoints "
    "[default: $METAKE_HOME, else the platform's user data directory].",
)
@click.option(
    "--db",
    "db_url",
    metavar="URL",
    help="SQLAlchemy database URL [default: $METAKE_DB_URL, else metake.sqlite3 in the data home].",
)
@click.option(
    "--umask",
    type=Umask(),
    default="077",
    show_default=True,
    help="File mode mask for what metake creates (the home, the database, checkpoints); 077: owner only.",
)
@click.option(
    "--audit-key",
    "audit_key_file",
    metavar="FILE",
    help="Secret key file (outside the database) that seals every audit event this command writes, "
    "and that `audit verify` checks [default: $METAKE_AUDIT_KEY_FILE; none]. See docs/audit.md.",
)
@click.version_option(package_name="metake-daemon")
@click.pass_context
def main(ctx: click.Context, home: str | None, db_url: str | None, umask: int, audit_key_file: str | None) -> None:
    """Keep a language model's facts corrected: queue, apply and audit fact corrections."""
    previous = os.umask(umask)
    ctx.call_on_close(lambda: os.umask(previous))
    store = StoreContext.resolve(home, db_url, audit_key_file)
    ctx.obj = store
    ctx.call_on_close(store.close)


@main.command()
@click.pass_obj
def init(store: StoreContext) -> None:
    """Create the data home and database at the newest schema."""
    store.initialise()
    click.echo(f"home: {store.home.root}")
    click.echo(f"database: {store.display_url} (revision {', '.join(current_revisions(store.engine()))})")


@main.group()
def db() -> None:
    """Manage the database schema."""


@db.command("upgrade")
@click.pass_obj
def db_upgrade(store: StoreContext) -> None:
    """Migrate the database to the newest schema revision (creating it if needed)."""
    store.upgrade()
    click.echo(f"database {store.display_url} is at revision {', '.join(current_revisions(store.engine()))}")


@main.command()
@click.option("--prompt", help="Template with one '{}' where the subject goes, e.g. 'The mother tongue of {} is'.")
@click.option("--subject", help="The subject, e.g. 'Danielle Darrieux'.")
@click.option("--target", help="The correct answer, e.g. 'English'.")
@click.option("--original", "original_answer", help="The answer the model gives now (measured before/after).")
@click.option("--paraphrase", "paraphrases", multiple=True, help="Another wording, subject written out. Repeatable.")
@click.option(
    "--neighbor",
    "neighbors",
    multiple=True,
    metavar="PROMPT=>ANSWER",
    help="A prompt about something else whose answer must not change. Repeatable.",
)
@click.option(
    "--priority",
    type=int,
    default=None,
    help="Higher is applied first; with --file, for records without one [default: 0].",
)
@click.option(
    "--file",
    type=click.Path(allow_dash=True, path_type=Path),
    help="JSON Lines or JSON list of corrections or CounterFact records ('-' for stdin).",
)
@click.option("--skip-invalid", is_flag=True, help="With --file: import the valid records, list the others.")
@click.option("--as", "submitter", default=None, help="Name to record as submitter [default: your login name].")
@click.option(
    "--model",
    "model_name",
    type=ModelName(),
    default=DEFAULT_MODEL_NAME,
    envvar=MODEL_NAME_ENV,
    show_default=True,
    help=f"The model these corrections are for (the daemon started with this --name applies them) [${MODEL_NAME_ENV}].",
)
@click.pass_obj
def submit(
    store: StoreContext,
    prompt: str | None,
    subject: str | None,
    target: str | None,
    original_answer: str | None,
    paraphrases: tuple[str, ...],
    neighbors: tuple[str, ...],
    priority: int | None,
    file: Path | None,
    skip_invalid: bool,
    submitter: str | None,
    model_name: str,
) -> None:
    """Queue corrections and print their new ids, one per line.

    Give one correction with --prompt/--subject/--target, or many with --file. A newer pending
    correction for the same subject, prompt and model supersedes the older pending one.
    """
    who = check_submitter(submitter if submitter is not None else login_name())
    if file is not None:
        single_fields = (prompt, subject, target, original_answer)
        if any(value is not None for value in single_fields) or paraphrases or neighbors:
            raise click.UsageError("--file cannot be combined with --prompt/--subject/--target/--original/...")
        corrections = _corrections_from_file(file, skip_invalid, priority)
    else:
        if prompt is None or subject is None or target is None:
            raise click.UsageError("give --prompt, --subject and --target, or --file")
        if skip_invalid:
            raise click.UsageError("--skip-invalid only applies to --file")
        corrections = [
            make_correction(
                prompt,
                subject,
                target,
                paraphrases=paraphrases,
                neighbors=[parse_neighbor_option(value) for value in neighbors],
                priority=0 if priority is None else priority,
                original_answer=original_answer,
            )
        ]
    sessions = store.sessions()
    if file is None:
        with sessions.begin() as session:
            ids = submit_many(session, corrections, who, model=model_name)
    else:
        from tqdm import tqdm  # only where a file is imported: submit starts without it

        with tqdm(total=len(corrections), desc="import", unit="rec", file=sys.stderr, disable=None) as bar:
            ids = import_corrections(
                sessions, corrections, who, model=model_name, source=str(file)[-200:], progress=bar.update
            )
    for new_id in ids:
        click.echo(new_id)
    if file is not None:
        click.echo(f"queued {len(ids)} correction(s) from {file}", err=True)


def _corrections_from_file(file: Path, skip_invalid: bool, priority: int | None) -> list[CorrectionInput]:
    """The file's corrections; any invalid record fails the whole file unless ``skip_invalid``."""
    parsed = _parse_file(file, 0 if priority is None else priority)
    if parsed.errors and not skip_invalid:
        raise InvalidInput(
            f"{file}: {len(parsed.errors)} invalid record(s), nothing imported "
            f"(--skip-invalid imports the {len(parsed.corrections)} valid one(s)):\n"
            + "\n".join(f"  {error}" for error in parsed.errors)
        )
    for error in parsed.errors:
        click.echo(f"skipped {file} {error}", err=True)
    return [correction for _line, correction in parsed.corrections]


def _parse_file(file: Path, default_priority: int) -> ParsedFile:
    if str(file) != "-":
        return read_corrections_file(file, default_priority)
    try:
        return parse_corrections_text(sys.stdin.read(), default_priority)
    except InvalidInput as error:
        raise InvalidInput(f"stdin: {error}") from error
    except UnicodeDecodeError as error:
        raise InvalidInput("stdin: not UTF-8 text") from error


CORRECTION_HEADERS = ("id", "status", "prio", "tries", "submitted (UTC)", "by", "prompt", "target")


def print_corrections(corrections: Sequence[Correction]) -> None:
    """The corrections as a table, with a model column once more than the default model appears."""
    if any(c.model != DEFAULT_MODEL_NAME for c in corrections):
        print_table(("id", "model", *CORRECTION_HEADERS[1:]), [_correction_row(c, True) for c in corrections])
    else:
        print_table(CORRECTION_HEADERS, [_correction_row(c) for c in corrections])


def _correction_row(c: Correction, with_model: bool = False) -> tuple[Any, ...]:
    return (
        c.id,
        *((c.model,) if with_model else ()),
        c.status.value,
        c.priority,
        c.attempts,
        _minute(c.submitted_at),
        c.submitter,
        c.filled_prompt(),
        c.target,
    )


@main.command()
@click.option(
    "--status",
    "statuses",
    type=STATUS_CHOICE,
    multiple=True,
    help="Show these statuses [default: pending, applying].",
)
@model_filter
@json_option
@click.pass_obj
def queue(store: StoreContext, statuses: tuple[str, ...], model_name: str | None, as_json: bool) -> None:
    """List queued corrections in the order they will be applied."""
    wanted = [CorrectionStatus(s.lower()) for s in statuses] or [
        CorrectionStatus.PENDING,
        CorrectionStatus.APPLYING,
    ]
    with store.read_sessions().begin() as session:
        corrections = queued_corrections(session, wanted, model_name)
        if as_json:
            print_json([correction_to_dict(c) for c in corrections])
        else:
            print_corrections(corrections)


@main.command()
@click.option("--subject", help="Only corrections of this subject (exact match).")
@click.option("--since", type=IsoTime(), help="Submitted at or after this time (UTC unless a zone is given).")
@click.option("--until", type=IsoTime(), help="Submitted before this time.")
@click.option("--status", "statuses", type=STATUS_CHOICE, multiple=True, help="Only these statuses. Repeatable.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many rows.")
@model_filter
@json_option
@click.pass_obj
def history(
    store: StoreContext,
    subject: str | None,
    since: datetime | None,
    until: datetime | None,
    statuses: tuple[str, ...],
    limit: int | None,
    model_name: str | None,
    as_json: bool,
) -> None:
    """List all corrections ever submitted, oldest first."""
    with store.read_sessions().begin() as session:
        corrections = correction_history(
            session,
            subject=subject,
            since=since,
            until=until,
            statuses=[CorrectionStatus(s.lower()) for s in statuses],
            limit=limit,
            model=model_name,
        )
        if as_json:
            by_correction = metrics_by_correction(session, [c.id for c in corrections])
            print_json(
                [
                    correction_to_dict(c) | {"metrics": [metric_to_dict(m) for m in by_correction.get(c.id, [])]}
                    for c in corrections
                ]
            )
        else:
            print_corrections(corrections)


@main.command()
@click.argument("correction_id", metavar="ID", type=click.IntRange(1, MAX_ROW_ID))
@json_option
@click.pass_obj
def show(store: StoreContext, correction_id: int, as_json: bool) -> None:
    """Show one correction with its audit story, edit and metrics."""
    with store.read_sessions().begin() as session:
        story = correction_story(session, correction_id)
        if as_json:
            record = correction_to_dict(story.correction)
            record["events"] = [event_to_dict(e) for e in story.events]
            record["edit"] = None if story.edit is None else edit_to_dict(story.edit)
            record["metrics"] = [metric_to_dict(m) for m in story.metrics]
            print_json([record])
            return
        _print_story(story)


def _print_story(story: CorrectionStory) -> None:
    c = story.correction
    click.echo(f"correction {c.id}: {c.status.value}")
    fields = [
        ("prompt", c.prompt),
        ("subject", c.subject),
        ("target", c.target),
        ("original answer", c.original_answer),
        ("priority", c.priority),
        ("submitted", f"{iso(c.submitted_at)} by {c.submitter}"),
        ("source", c.source),
        ("attempts", c.attempts),
        ("last error", c.last_error),
        ("superseded by", c.superseded_by),
    ]
    fields += [(f"paraphrase {i}", p) for i, p in enumerate(c.paraphrases, 1)]
    fields += [(f"neighbor {i}", f"{n['prompt']} => {n['answer']}") for i, n in enumerate(c.neighbors, 1)]
    for label, value in fields:
        if value is not None:
            click.echo(f"  {label + ':':17}{_cell(value) if isinstance(value, str) else value}")
    click.echo("history:")
    print_table(("event", "at (UTC)", "kind", "actor", "details"), [_event_row(e) for e in story.events])
    if story.edit is not None:
        e = story.edit
        finished = iso(e.finished_at) or "unfinished"
        click.echo(f"edit {e.id}: {e.method} on {e.model}, layers {e.layers}, {iso(e.started_at)} .. {finished},")
        click.echo(f"  checkpoint {e.checkpoint_before_id} -> {e.checkpoint_after_id}")
    if story.metrics:
        click.echo("metrics:")
        print_table(
            ("name", "phase", "value", "scope"),
            [
                (m.name, m.phase.value, f"{m.value:.6g}", "batch" if m.correction_id is None else "this")
                for m in story.metrics
            ],
        )


def _event_row(event: AuditEvent) -> tuple[Any, ...]:
    details = json.dumps(event.payload, ensure_ascii=False, sort_keys=True) if event.payload else ""
    return (event.id, iso(event.at), event.kind, event.actor, details)


@main.command()
@json_option
@model_filter
@click.pass_obj
def checkpoints(store: StoreContext, as_json: bool, model_name: str | None) -> None:
    """List saved model checkpoints (of every model, or of --model NAME).

    Pruned checkpoints keep their row (and hash) but no longer their file.
    """
    with store.read_sessions().begin() as session:
        rows = all_checkpoints(session) if model_name is None else model_checkpoints(session, model_name)
        if as_json:
            print_json([checkpoint_to_dict(c) for c in rows])
            return
        print_table(
            ("id", "parent", "created (UTC)", "size", "sha256", "state", "model", "base model", "path"),
            [
                (
                    c.id,
                    c.parent_id,
                    _minute(c.created_at),
                    c.size_bytes,
                    c.sha256[:12],
                    "pruned" if c.pruned else "kept",
                    c.model,
                    c.base_model,
                    c.path,
                )
                for c in rows
            ],
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the screen.")
@model_filter
@click.pass_obj
def status(store: StoreContext, as_json: bool, model_name: str | None) -> None:
    """One screen: the models, their daemons, the queue, the last edit, checkpoint and health check, the audit log."""
    with store.read_sessions().begin() as session:
        found = gather_status(session, model_name)
    if as_json:
        click.echo(json.dumps(found.to_dict(), indent=2, ensure_ascii=False, default=iso))
        return
    for line in status_lines(found):
        click.echo(line)


@main.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("metake-report.html"),
    show_default=True,
    help="The HTML file to write (one self-contained page; images inlined).",
)
@click.option("--since", type=IsoTime(), default=None, help="Only corrections submitted at or after this time.")
@model_filter
@click.pass_obj
def report(store: StoreContext, out: Path, since: datetime | None, model_name: str | None) -> None:
    """Write an HTML report with figures: corrections, before/after, health, weight change, checkpoints."""
    from reporting.html_report import render_report  # matplotlib: imported only for this command

    with store.read_sessions().begin() as session:
        data = report_data(session, since, model_name)
    title = f"metake report: {store.home.root}" + (f", model {model_name}" if model_name else "")
    page = render_report(data, title, datetime.now(UTC))
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as error:
        raise InvalidInput(f"cannot write {out}: {error.strerror or error}") from error
    click.echo(f"wrote {out} ({len(page) / 1e6:.1f} MB, {len(data.corrections)} corrections)")


def status_lines(found: Status) -> list[str]:
    """The text of `metake status`, a label and a line per thing."""
    now = found.now
    lines = []
    if not found.models:
        lines.append("model       none edited yet (no checkpoint); start `metake daemon` or run `metake apply`")
    for model in found.models:
        layers = f"layers {model.layers[0]}-{model.layers[-1]}" if model.layers else "layers ?"
        lines.append(
            f"model       {model.name}: {(model.identity or 'no checkpoint yet')[:23]} "
            f"({model.source or 'source unknown'}), method {model.method or '?'}, {layers}, "
            f"{model.edits if model.edits is not None else '?'} edits, {model.pending} pending"
        )
        lease = model.lease
        lines.append(
            f"daemon      {lease['holder']} since {_when(lease['since'], now)}, lease expires in "
            f"{max(0, round((lease['expires'] - now).total_seconds()))} s"
            if lease
            else "daemon      no daemon holds this model"
        )
        head = model.head_checkpoint
        if head:
            lines.append(
                f"checkpoint  {head['id']} ({head['kind'] or '?'}), {_when(head['created_at'], now)}, "
                f"{head['size_bytes'] / 1e6:.1f} MB"
            )
    shown = {name: count for name, count in found.queue.items() if count or name not in IMPORT_ONLY_STATUSES}
    lines.append("queue       " + ", ".join(f"{name} {count}" for name, count in shown.items()))
    for running in found.imports:
        lines.append(
            f"import      {running['id']} by {running['submitter']} for {running['model']}: {running['staged']} of "
            f"{running['records']} staged, started {_when(running['started'], now)}, last chunk "
            f"{_when(running['heartbeat'], now)}"
        )
    last = found.last_applied
    lines.append(
        f"last edit   correction {last['id']} ({last['subject']} -> {last['target']}), {_when(last['at'], now)}"
        if last
        else "last edit   none applied yet"
    )
    health = found.last_health
    if health:
        parts = [_when(health["at"], now)]
        if health.get("retention") is not None:
            parts.append(f"retention {health['retention']:.0%} of {health.get('tested')} re-tested")
        if health.get("gen_retention") is not None:
            parts.append(f"{health['gen_retention']:.0%} still said when generating")
        if health.get("perplexity_ratio") is not None:
            parts.append(f"perplexity {health['perplexity']:.2f} ({health['perplexity_ratio'] - 1:+.1%} from unedited)")
        lines.append("health      " + ", ".join(parts))
    else:
        lines.append("health      no check yet")
    lines.append(f"audit       {found.audit_events} events, newest verify: {found.audit_quick_check}")
    return lines


def _when(at: datetime | None, now: datetime) -> str:
    if at is None:
        return "at an unknown time"
    seconds = max(0, int((now - at).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago ({iso(at)})"
    return f"{seconds} s ago ({iso(at)})"


@main.group()
def audit() -> None:
    """Check the audit log."""


@audit.command("new-key")
@click.argument("key_file", type=click.Path(path_type=Path, dir_okay=False))
def audit_new_key(key_file: Path) -> None:
    """Write a new random audit key to KEY_FILE (mode 0600; never overwrites).

    Keep it away from the database's administrators and give it to every metake process that
    writes (`--audit-key KEY_FILE` or $METAKE_AUDIT_KEY_FILE): events are sealed from then on.
    """
    write_new_audit_key(key_file)
    click.echo(f"wrote a {KEY_BYTES}-byte audit key to {key_file}")


@audit.command("head")
@click.pass_obj
def audit_head(store: StoreContext) -> None:
    """Print the chain's newest event and hash as JSON, to keep outside the database.

    `metake audit verify --head FILE` later shows that no event up to it was removed or rewritten.
    """
    with store.read_sessions().begin() as session:
        head = chain_head(session)
    if head is None:
        raise click.ClickException("the audit chain is empty; there is no head to record")
    click.echo(json.dumps({"event": head.event_id, "hash": head.hash}))


def _read_head(path: Path) -> ChainHead:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ChainHead(int(data["event"]), str(data["hash"]))
    except OSError as error:
        raise InvalidInput(f"cannot read {path}: {error.strerror or error}") from error
    except (ValueError, TypeError, KeyError) as error:
        raise InvalidInput(f"{path} is not a head written by `metake audit head`") from error


@audit.command("verify")
@click.option(
    "--head",
    "head_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A head written earlier by `metake audit head`: also check that the chain still holds it.",
)
@json_option
@click.pass_obj
def audit_verify(store: StoreContext, head_file: Path | None, as_json: bool) -> None:
    """Walk the audit hash chain, then check every correction and checkpoint row against its events.

    Exits 1 naming the first bad event, or the first row that differs from what its events recorded.
    """
    head = _read_head(head_file) if head_file is not None else None
    with store.read_sessions().begin() as session:
        damage = damage_report(session)
        if damage is not None:
            raise click.ClickException(f"the database file is damaged ({damage}); restore it from a backup")
        broken = verify_chain(session, key=store.audit_key)
        sealed = sealed_from(session) if store.audit_key is not None and broken is None else None
        if broken is None and head is not None:
            lost = check_head(session, head)
            broken = ChainBreak(head.event_id, lost) if lost else None
        count = event_count(session)
        rows = verify_rows(session) if broken is None else None
    mismatch = rows.mismatch if rows is not None else None
    if as_json:
        result: dict[str, Any] = {
            "ok": broken is None and mismatch is None,
            "events": count,
            "first_bad_event": None,
            "reason": None,
            "corrections": rows.corrections if rows else None,
            "checkpoints": rows.checkpoints if rows else None,
            "edits": rows.edits if rows else None,
            "first_bad_row": None,
            "sealed_from_event": sealed,
        }
        if broken is not None:
            result |= {"first_bad_event": broken.event_id, "reason": broken.reason}
        if mismatch is not None:
            result |= {"first_bad_row": {"table": mismatch.table, "id": mismatch.row_id}, "reason": mismatch.reason}
        print_json([result])
    if broken is not None:
        raise click.ClickException(f"audit chain broken at event {broken.event_id}: {broken.reason}")
    if mismatch is not None:
        where = f"{mismatch.table.removesuffix('s')} {mismatch.row_id}"
        raise click.ClickException(f"audit chain verified, but {where} does not match its events: {mismatch.reason}")
    if not as_json and rows is not None:
        click.echo(f"audit chain verified: {count} events")
        counts = f"{rows.corrections} corrections, {rows.checkpoints} checkpoints, {rows.edits} edits"
        click.echo(f"rows match their events: {counts}")
        if head is not None:
            click.echo(f"the recorded head, event {head.event_id}, is in the chain")
        if sealed is not None:
            before = f" (events 1-{sealed - 1} were written before the key was used)" if sealed > 1 else ""
            click.echo(f"MACs under the audit key verified from event {sealed} on{before}")


for _command in (*COMMANDS, bench):
    main.add_command(_command)


if __name__ == "__main__":
    main()
