"""distil-search: the command line. Bad input prints one message (no traceback) and exits 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from distil_core.errors import UserInputError

from . import SearchInterrupted


def _train(args: argparse.Namespace) -> int:
    from .fulltrain import check_scaling, train_on_ray

    check_scaling(args.num_workers, args.gpus_per_worker, args.address)  # before torch & co. load
    from distil_core.config import load_config
    from distil_core.recipe import distill

    cfg = load_config(args.config, args.set)
    if args.num_workers > 1:  # data-parallel on Ray Train; one worker stays in-process
        summary = train_on_ray(cfg, args.num_workers, args.gpus_per_worker, args.address, resume=args.resume,
                               overwrite=args.overwrite, progress=not args.no_progress)
    else:
        summary = distill(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    out = cfg.output.dir
    if summary["status"] != "completed":
        print(f"run stopped: {summary['message']}; see {out}/metrics.json", file=sys.stderr)
        return 3
    key = f"dev/{summary['main_metric']}"
    teacher = summary["teacher_metrics"].get(key)
    line = f"student {key} = {summary['metrics'].get(key, float('nan')):.4f}"
    if teacher:
        line += f" (teacher {teacher:.4f}, retention {summary['metrics'][key] / teacher:.1%})"
    if (floor := summary.get("majority_class_metrics", {}).get(key)) is not None:
        line += f"; majority class {floor:.4f}"
    s, t = summary["student"], summary["teacher"]
    print(line)
    print(f"student {s['total']:,} parameters ({s['non_embedding']:,} non-embedding) vs teacher {t['total']:,}")
    dp = summary.get("data_parallel") or {}
    if dp.get("world_size", 1) > 1:
        print(f"data-parallel on {dp['world_size']} workers: {dp['examples_per_rank']} examples per rank")
    print(f"wrote {out}/student, {out}/metrics.json, {out}/tb")
    return 0


def _print_summary(summary: dict) -> None:
    from rich.console import Console

    from .results import majority_floor

    out = Console(soft_wrap=True)  # a long experiment path stays one line, to copy
    metric, teacher = summary["main_metric"], summary["teacher"]
    c = summary["counts"]
    out.print(f"{summary['trials']} trials: {c['TERMINATED']} finished, {c['PRUNED']} pruned by ASHA, "
              f"{c['ERROR']} failed; {summary['wall_seconds']:.0f}s")
    best = summary["best"]
    if best is None:
        out.print("no trial finished")
        return
    t_metric = teacher["metrics"].get(metric)
    out.print("best configuration:")
    for key, value in best["overrides"].items():
        out.print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    retention = f" = {best['main'] / t_metric:.1%} of the teacher's {t_metric:.4f}" if t_metric else ""
    out.print(f"dev {metric}: {best['main']:.4f}{retention}")
    if (floor := majority_floor(summary)) is not None:
        out.print(f"majority-class baseline: dev {metric} {floor:.4f}")  # the constant predictor's
    # Two lines, so that neither runs past an 80-column terminal.
    out.print(f"size: {best['params']:,} parameters vs teacher {teacher['params']:,} "
              f"({best['params'] / teacher['params']:.0%})")
    out.print(f"latency: {best['latency_ms']:.1f} ms vs {best['teacher_latency_ms']:.1f} ms, "
              f"{best['speedup']:.1f}x faster (batch 1, in turn)")
    d = summary.get("defaults_trial")
    if d and d.get("main") is not None:
        out.print(f"DistilBERT defaults (first trial, {d['status'].lower()}): dev {metric} {d['main']:.4f}")
    for i, r in enumerate(summary.get("confirm") or []):
        out.print(f"confirm #{i + 1}: trial {r['trial_id']} mean {r['mean']:.4f} +- {r['std']:.4f} over {len(r['values'])} seeds")
    out.print(f"results: {summary['experiment']} (summary.json, optuna.db, trials)")


def _run(args: argparse.Namespace) -> int:
    from distil_core.config import parse_override

    from .run import SearchOptions, run_search
    from .space import space_file

    opts = SearchOptions(space=str(space_file(args.space)), name=args.name, storage=args.storage, address=args.address,
                         task=args.task, data_dir=args.data_dir, teacher=args.teacher, cache_dir=args.cache_dir,
                         num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                         cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                         max_failures=args.max_failures, seed=args.seed,
                         objectives=args.objectives.split(",") if args.objectives else None,
                         warm_start=args.warm_start, confirm_top_k=args.confirm_top_k, seeds=args.seeds,
                         sampler=args.sampler, scheduler=args.scheduler, defaults_first=not args.no_defaults_first,
                         live=not args.no_progress, overrides=dict(parse_override(o) for o in args.set))
    _print_summary(run_search(opts))
    return 0


def _resume(args: argparse.Namespace) -> int:
    from .run import resume_search

    _print_summary(resume_search(args.experiment, args.storage, args.address, live=not args.no_progress))
    return 0


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .results import load_meta, majority_floor, resolve_experiment, trial_rows, tune_state_file

    exp = resolve_experiment(args.experiment, args.storage)
    _say_mirror(exp)
    meta = load_meta(exp.local)
    metric = meta["main_metric"]
    floor = majority_floor(meta)
    table = Table(title=f"{exp.name}: dev {metric} (teacher {meta['teacher']['metrics'].get(metric, float('nan')):.4f}"
                        + (f", majority class {floor:.4f})" if floor is not None else ")"))
    keys = meta["searched_keys"]
    for col in ["trial", "state", *keys, "best", "last", "step"]:
        table.add_column(col)
    for r in trial_rows(exp.local):
        vals = [r["overrides"].get(k) for k in keys]
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in vals]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row(r["trial_id"], r["status"], *cells, fmt(r["best_main"]), fmt(r["main"]),
                      f"{r['step'] or 0}/{r['total_steps'] or '?'}")
    state = tune_state_file(exp.local)
    if state:  # an interrupted search's last save still says RUNNING: the time tells them apart
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.stat().st_mtime))
        table.caption = f"as Tune last saved it, {saved}"
    console = Console()
    if not console.is_terminal:  # piped or logged: no 80-column squeeze
        console = Console(width=240)
    console.print(table)
    return 0


def _say_mirror(exp) -> None:
    if exp.remote:
        print(f"{exp.uri}: read from its local mirror {exp.local}", file=sys.stderr)


def _export(args: argparse.Namespace) -> int:
    from .export import export

    s = export(args.experiment, args.out, args.storage, args.trial, args.overwrite)
    metric = f"dev_{s['main_metric']}"
    again = (s["reevaluated"] or {}).get(metric)
    line = f"trial {s['trial_id']}: reported dev {s['main_metric']} {s['metrics'].get('main', float('nan')):.4f}"
    if again is not None:
        line += f", {again:.4f} evaluated again from the exported folder"
    print(line)
    print(f"wrote {s['out']}/student (from_pretrained), {s['out']}/train.yaml (distil-search train), "
          f"{s['out']}/summary.json")
    return 0


def _tensorboard(args: argparse.Namespace) -> int:
    from .results import resolve_experiment
    from .tensorboard import mirror_events, serve

    exp = resolve_experiment(args.experiment, args.storage, pull=False)
    if exp.remote:
        mirror_events(exp)
        print(f"TensorBoard for {exp.uri}: its event files mirrored to {exp.local} (refreshed every 30 s), "
              f"served from there at http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    else:
        print(f"TensorBoard for {exp.local} at http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    serve(exp.local, args.host, args.port)
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .report import write_report
    from .results import resolve_experiment

    exp = resolve_experiment(args.experiment, args.storage)
    _say_mirror(exp)
    path = write_report(exp.local, Path(args.out).expanduser() if args.out else None, top_k=args.top_k)
    print(f"wrote {path} (plots beside it)")
    return 0


STORAGE_HELP = ("where experiments live: a folder (path or file:// URI; on a cluster one every node mounts), or "
                "object storage: s3://BUCKET/PATH, gs://BUCKET/PATH (options as a query, e.g. "
                "?endpoint_override=HOST:PORT&scheme=http); default $DISTIL_SEARCH_STORAGE or ~/distil-search/experiments")
EXPERIMENT_HELP = "experiment name (under --storage), folder or URI"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distil-search", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run one distillation from a YAML config")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set optim.lr=3e-5 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from output.dir's last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace what output.dir holds")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--num-workers", type=int, default=1, metavar="N",
                       help="data-parallel Ray Train workers (DDP); 1 (default): in-process")
    train.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G", help="0 (default): CPU workers")
    train.add_argument("--address", help="an existing Ray cluster (default: start a local Ray); output.dir "
                                         "and the cache root must then be on storage all its nodes reach")
    train.set_defaults(func=_train)

    run = sub.add_parser("run", help="search distillation settings (Ray Tune + Optuna + ASHA)")
    run.add_argument("space", help="a space file, or a preset name: quickstart, sst2, glue-small, distilbert")
    run.add_argument("--task", help="GLUE task, overriding the space's data.task")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="set a key of the space's base config, e.g. --set data.train_limit=null; a searched key is "
                          "then fixed, e.g. --set student.num_layers=3 searches 3-layer students (repeatable)")
    run.add_argument("--data-dir", help="GLUE folder (default $GLUE_DIR, else the hub)")
    run.add_argument("--teacher", help="hub id, local folder or minilm-l6")
    run.add_argument("--cache-dir", help="cache root shared by the trials (on a cluster: shared storage)")
    run.add_argument("--num-samples", type=int)
    run.add_argument("--max-concurrent", type=int)
    run.add_argument("--cpus-per-trial", type=float)
    run.add_argument("--gpus-per-trial", type=float, help="fractions share a GPU, e.g. 0.25")
    run.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial from its checkpoint")
    run.add_argument("--seed", type=int, help="the sampler's seed")
    run.add_argument("--objectives", help="main (default), or main,latency / main,params for NSGA-II")
    run.add_argument("--warm-start", metavar="EXPERIMENT", help="run an earlier experiment's 3 best configurations first (those that "
                     "agree with --set's fixed keys first)")
    run.add_argument("--confirm-top-k", type=int, default=0, metavar="K", help="re-run the top K and the DistilBERT defaults with --seeds seeds")
    run.add_argument("--seeds", type=int, default=3)
    run.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="random: a baseline")
    run.add_argument("--scheduler", choices=["asha", "fifo"], default="asha", help="fifo: no early stopping")
    run.add_argument("--no-defaults-first", action="store_true",
                     help="do not start with the DistilBERT defaults (to compare searchers alone)")
    run.add_argument("--name", help="experiment name (default: space-task-time)")
    resume = sub.add_parser("resume", help="finish an interrupted search")
    status = sub.add_parser("status", help="a table of a search's trials (also while it runs)")
    for p in (resume, status):
        p.add_argument("experiment", help=EXPERIMENT_HELP)
    for p in (run, resume, status):
        p.add_argument("--storage", help=STORAGE_HELP)
    for p in (run, resume):
        p.add_argument("--address", help="an existing Ray cluster (default: start a local Ray)")
        p.add_argument("--no-progress", action="store_true", help="no live view")
    run.set_defaults(func=_run)
    resume.set_defaults(func=_resume)
    status.set_defaults(func=_status)

    export = sub.add_parser("export", help="write the best (or a named) trial's student, train.yaml and summary")
    export.add_argument("experiment", help=EXPERIMENT_HELP)
    export.add_argument("--out", required=True, help="folder to write (student/, train.yaml, summary.json)")
    export.add_argument("--trial", help="a trial id (default: the confirmed winner, else the best finished trial)")
    export.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    board = sub.add_parser("tensorboard", help="TensorBoard (HParams table and curves) for an experiment")
    board.add_argument("experiment", help=EXPERIMENT_HELP)
    board.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    board.add_argument("--port", type=int, default=6006)
    for p in (export, board):
        p.add_argument("--storage", help=STORAGE_HELP)
    export.set_defaults(func=_export)
    board.set_defaults(func=_tensorboard)
    report = sub.add_parser("report", help="report.md and plots of a search (best so far, Pareto fronts, "
                                           "importances, learning curves, top trials)")
    report.add_argument("experiment", help=EXPERIMENT_HELP)
    report.add_argument("--storage", help=STORAGE_HELP)
    report.add_argument("--out", help="report folder (default EXPERIMENT/report, for object storage in its local "
                                      "mirror; an earlier report there is replaced)")
    report.add_argument("--top-k", type=int, default=5, help="trials in the table and the learning curves")
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("DISTIL_SEARCH_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "no_progress", False):  # also the libraries' bars (loading weights, tokenizing)
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SearchInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
