"""`rs5m rate`: draw a rating queue from shards and serve it, or print the summary of ratings."""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", action="append", default=None,
                   help="shards to draw from: a brace pattern, glob, directory or s3:// URL (repeatable); "
                        "needed only the first time for --out")
    p.add_argument("--out", help="ratings directory: queue, images, ratings.csv (local)")
    p.add_argument("--sample", type=int, default=2000, help="samples to draw (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    p.add_argument("--raters", default="", help="comma-separated rater names, added to those --out holds")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    p.add_argument("--summary", metavar="RATINGS",
                   help="print the table (mean ± std per source, n) and rater agreement of a ratings "
                        "directory or CSV, then exit")


def run(args: argparse.Namespace) -> int:
    try:
        if args.summary:
            from rs5m_ray.rate.summary import format_summary, summarize

            print(format_summary(summarize(args.summary)))
            return 0
        return _serve(args)
    except ValueError as e:
        raise SystemExit(f"rs5m rate: {e}") from None


def _serve(args: argparse.Namespace) -> int:
    from rs5m_ray.rate.draw import open_queue
    from rs5m_ray.rate.server import RatingSession, serve, update_raters
    from rs5m_ray.storage import is_local

    if not args.out:
        raise ValueError("give --out (the ratings directory), or --summary RATINGS")
    if not is_local(args.out):
        raise ValueError(f"--out must be a local directory (every answer is fsynced there), got {args.out}")
    if args.sample < 1:
        raise ValueError(f"--sample must be at least 1, got {args.sample}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0-65535, got {args.port}")
    os.makedirs(args.out, exist_ok=True)
    raters = update_raters(args.out, [n.strip() for n in args.raters.split(",") if n.strip()])
    queue = open_queue(args.out, args.shards, args.sample, args.seed)
    if not queue["samples"]:
        raise ValueError(f"the queue of {args.out} is empty: its shards hold no readable sample")
    if queue["skipped"]:
        print(f"skipped while drawing: {queue['skipped']}", file=sys.stderr)
    serve(RatingSession(args.out, queue, raters), args.host, args.port)
    return 0
