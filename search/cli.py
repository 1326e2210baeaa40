"""distil-search: the command line. Bad input prints one message (no traceback) and exits 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from distil_core.errors import UserInputError


def _train(args: argparse.Namespace) -> int:
    from distil_core.config import load_config
    from distil_core.recipe import distill

    cfg = load_config(args.config, args.set)
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
    s, t = summary["student"], summary["teacher"]
    print(line)
    print(f"student {s['total']:,} parameters ({s['non_embedding']:,} non-embedding) vs teacher {t['total']:,}")
    print(f"wrote {out}/student, {out}/metrics.json, {out}/tb")
    return 0


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
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("DISTIL_SEARCH_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
