"""``metake bench``: the benchmark table of MetaKE against AlphaEdit and MEMIT.

Torch and the engine are imported inside the command so that registering it keeps the rest of
the ``metake`` CLI quick to start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from engine.methods import METHODS
from storage.home import resolve_home


def _read_text_sample(path: Path | None, max_chars: int) -> list[str]:
    if path is None:
        return []
    try:
        return [path.read_text(errors="replace")[:max_chars]]
    except OSError as exc:
        raise click.ClickException(f"cannot read the perplexity text {path}: {exc.strerror}") from exc


@click.command()
@click.option(
    "--data",
    "data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="A CounterFact (EasyEdit format) or zsRE (MEND/EasyEdit format) JSON file; the format is detected.",
)
@click.option("--n", "n", type=click.IntRange(min=1), default=200, show_default=True, help="Records to edit.")
@click.option(
    "--offset",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Start at this record of the file (e.g. 1000: past the records anyone tuned on).",
)
@click.option("--methods", default="metake,alphaedit,memit", show_default=True, help="Comma-separated methods.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--model", "model", default="default", show_default=True, help="HF model directory, .gguf file, or default."
)
@click.option("--hparams", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Hyperparameter TOML.")
@click.option(
    "--method-hparams",
    "method_hparams",
    multiple=True,
    metavar="METHOD=FILE",
    help="A method's own hyperparameter TOML (e.g. tuned); repeatable. Same layers as --hparams.",
)
@click.option("--stats-source", help="C0 text source: 'model' or a text file/folder (overrides the hparams).")
@click.option("--stats-tokens", type=click.IntRange(min=1000), help="Tokens for C0 (overrides the hparams).")
@click.option("--layers", help="Comma-separated critical layers (overrides the hparams).")
@click.option(
    "--ppl-text",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A text file whose first --ppl-chars characters measure perplexity drift.",
)
@click.option("--ppl-chars", type=click.IntRange(min=1000), default=20000, show_default=True)
@click.option(
    "--fluency-n",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Records whose rewrite prompt is continued for the fluency figure (with --lifelong: the first "
    "N of the stream, at every point).",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present).")
@click.option("--dtype", default="float32", show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch CPU threads (default: the cores this process may use); recorded with the results.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per method instead of a table.")
@click.option(
    "--lifelong",
    is_flag=True,
    help="Stream the records and measure every --eval-every edits: curves.jsonl and plots in --out (resumable).",
)
@click.option("--eval-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="With --lifelong: its folder.")
@click.option(
    "--rekey-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="With --lifelong: rebuild the accumulated constraints from the applied corrections' current keys "
    "after each point past a multiple of this many edits (0: never).",
)
@click.option(
    "--rehearse-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="With --lifelong: after each point past a multiple of this many edits, apply again the earlier "
    "corrections greedy decoding no longer begins with (0: never).",
)
@click.pass_context
def bench(
    ctx: click.Context,
    data: Path,
    n: int,
    offset: int,
    methods: str,
    batch_size: int,
    model: str,
    hparams: Path | None,
    method_hparams: tuple[str, ...],
    stats_source: str | None,
    stats_tokens: int | None,
    layers: str | None,
    ppl_text: Path | None,
    ppl_chars: int,
    fluency_n: int,
    device: str | None,
    dtype: str,
    threads: int | None,
    as_json: bool,
    lifelong: bool,
    eval_every: int,
    out_dir: Path | None,
    rekey_every: int,
    rehearse_every: int,
) -> None:
    """Edit the first N records in sequence with each method on the same model; print one table."""
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise click.UsageError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    import torch

    from engine.hparams import EditHyperParams
    from engine.models import ModelLoadError, load_model
    from evaluation.bench import format_table, run_benchmark
    from evaluation.counterfact import load_counterfact
    from evaluation.zsre import is_zsre, load_zsre

    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    per_method: dict[str, Path] = {}
    for item in method_hparams:
        name, sep, file = item.partition("=")
        if not sep or name not in chosen or not Path(file).is_file():
            raise click.UsageError(f"--method-hparams {item!r}: expected METHOD=FILE with a chosen method and a file")
        per_method[name] = Path(file)
    home = getattr(ctx.obj, "home", None) or resolve_home(None)
    try:
        given = EditHyperParams.from_file(hparams) if hparams else None
        loaded = load_model(
            model,
            cache_dir=home.models_dir,
            device=device,
            dtype=dtype,
            architecture=given.architecture if given else None,
        )
        hp = EditHyperParams.resolve(loaded.model_type, loaded.n_layers, hparams)
    except (ModelLoadError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    def overridden(base: EditHyperParams) -> EditHyperParams:
        if stats_source or stats_tokens:
            base = base.with_changes(
                stats={k: v for k, v in (("source", stats_source), ("n_tokens", stats_tokens)) if v}
            )
        return base.with_changes(layers=[int(x) for x in layers.split(",")]) if layers else base

    hp = overridden(hp)
    try:
        tuned = {
            name: overridden(EditHyperParams.resolve(loaded.model_type, loaded.n_layers, file, name))
            for name, file in per_method.items()
        }
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    with open(data) as handle:
        zsre = is_zsre(json.load(handle))
    records = load_zsre(data, n, offset) if zsre else load_counterfact(data, n, offset)
    if not records:
        raise click.UsageError(f"no records in {data} from record {offset} on")
    if lifelong:
        if out_dir is None or zsre:
            raise click.UsageError("--lifelong needs --out DIR and CounterFact records")
        from evaluation.lifelong import run_lifelong, summary_table

        points = run_lifelong(
            loaded,
            {m: tuned.get(m, hp).with_changes(method=m) for m in chosen},
            records,  # type: ignore[arg-type]
            batch_size,
            eval_every,
            out_dir,
            home.stats_dir,
            _read_text_sample(ppl_text, ppl_chars),
            rekey_every=rekey_every,
            fluency_n=fluency_n,
            rehearse_every=rehearse_every,
        )
        click.echo(summary_table(points))
        click.echo(f"{len(points)} points in {out_dir / 'curves.jsonl'}; plots in {out_dir}")
        return
    results = run_benchmark(
        loaded,
        hp,
        records,
        chosen,
        batch_size,
        home.stats_dir,
        _read_text_sample(ppl_text, ppl_chars),
        fluency_n,  # type: ignore[arg-type]
        method_hparams=tuned,
    )
    rows = [r.summary() | {"threads": threads, "batch_size": batch_size} for r in results]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(
        f"model {loaded.source} ({loaded.identity[:19]}), layers {list(hp.layers)}, {len(records)} "
        f"{'zsRE' if zsre else 'CounterFact'} records from {offset}, "
        f"batch size {batch_size}, device {loaded.device}, {threads} thread(s), "
        f"C0 source {hp.stats.source} ({hp.stats.n_tokens} tok)"
    )
    click.echo(format_table(rows))


if __name__ == "__main__":
    bench()
