"""`bottleneck cache info | compact | gc`: what a cache folder holds, one file per store, what can go."""

from __future__ import annotations

import argparse
import json
import time

from bottleneck.cli.common import LOCK_TIMEOUT, stderr
from bottleneck.text import format_bytes


def _say_foreign(paths, out) -> None:
    for path in paths:
        out(f"{path}: not a bottleneck file, left alone")


def info(args: argparse.Namespace) -> int:
    """List every store: backbone, rows, failures, segments, size on disk."""
    from bottleneck.features.maintenance import foreign_files, store_info, stores_in

    infos = [store_info(store) for store in stores_in(args.cache, args.store)]
    out = stderr if args.json else print
    _say_foreign(foreign_files(args.cache), out)
    if not infos:
        out(f"{args.cache}: no feature store")
    for item in infos:
        weights = item["weights"] or "?"
        warning = "" if item["pretrained"] in (None, True) else "  RANDOM WEIGHTS"
        pending = f", {item['pending']} pending (brought in by the next run)" if item["pending"] else ""
        out(
            f"{item['fingerprint']}  {item['architecture'] or '?'} ({weights}, {item['input_size'] or '?'} px, "
            f"{item['feature_dim']}-d {item['dtype']}){warning}"
        )
        out(
            f"  {item['rows']} images, {item['failures']} failures, {item['segments']} segments{pending}, "
            f"{format_bytes(item['bytes'])}, updated {item['updated'] or '?'}"
        )
        if item.get("computed_by"):
            out("  computed by " + "; ".join(f"{name}: {count}" for name, count in sorted(item["computed_by"].items())))
    if args.json:
        print(json.dumps({"cache": str(args.cache), "stores": infos}, default=str))
    return 0


def compact(args: argparse.Namespace) -> int:
    """Rewrite each store's segments into one file (optionally converting its dtype)."""
    from bottleneck.features.maintenance import compact as compact_store
    from bottleneck.features.maintenance import stores_in

    results = []
    for store in stores_in(args.cache, args.store):
        started = time.monotonic()
        changed, before, after = compact_store(store, args.dtype, args.lock_timeout, on_wait=stderr)
        seconds = time.monotonic() - started
        results.append(
            {
                "fingerprint": store.fingerprint,
                "changed": changed,
                "bytes_before": before,
                "bytes_after": after,
                "seconds": round(seconds, 3),
            }
        )
        line = (
            f"{store.fingerprint}: {format_bytes(before)} -> {format_bytes(after)} in one segment ({seconds:.1f} s)"
            if changed
            else f"{store.fingerprint}: already one segment, nothing to do"
        )
        (stderr if args.json else print)(line)
    if args.json:
        print(json.dumps({"stores": results}))
    return 0


def gc(args: argparse.Namespace) -> int:
    """List (or with --delete, remove) what no store or run needs."""
    from bottleneck.features.maintenance import collect_garbage, foreign_files
    from bottleneck.learn.run_folder import referenced_fingerprints

    keep = referenced_fingerprints(args.runs) if args.runs else None
    garbage, busy = collect_garbage(args.cache, keep, delete=args.delete)
    out = stderr if args.json else print
    _say_foreign(foreign_files(args.cache), out)
    verb = "removed" if args.delete else "would remove"
    for item in garbage:
        out(f"{verb} {item.path} ({format_bytes(item.bytes)}): {item.reason}")
    for fingerprint in busy:
        out(f"skipped {fingerprint}: a run is writing it")
    total = sum(item.bytes for item in garbage)
    out(
        f"{verb} {len(garbage)} items, {format_bytes(total)}"
        + ("" if args.delete or not garbage else "; pass --delete to remove them")
    )
    if args.json:
        print(
            json.dumps({"deleted": args.delete, "bytes": total, "items": [g.as_json() for g in garbage], "busy": busy})
        )
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "cache",
        help="list, compact or clean a cache folder",
        description="Look after a cache folder: `info` lists its stores, `compact` rewrites a store's segments into "
        "one file, `gc` lists what no store or run needs (and removes it with --delete).",
        epilog="example: bottleneck cache info --cache cache; bottleneck cache gc --cache cache --runs runs --delete",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, handler, text in (
        ("info", info, "list stores: backbone, images, failures, segments, size"),
        ("compact", compact, "rewrite each store into one segment (optional, explicit)"),
        ("gc", gc, "list what can go; --delete removes it"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--cache", default="cache", help="cache folder (default: ./cache)")
        action.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
        if name != "gc":
            action.add_argument(
                "store", nargs="*", metavar="FINGERPRINT", help="only these stores (a prefix is enough)"
            )
        action.set_defaults(handler=handler)
        if name == "compact":
            action.add_argument(
                "--dtype",
                choices=["float32", "float16"],
                default=None,
                help="also convert the rows (float16 halves the size; heads still compute in float32)",
            )
            action.add_argument(
                "--lock-timeout",
                type=LOCK_TIMEOUT,
                default=None,
                metavar="SECONDS",
                help="wait at most this long for a run writing the store, %(type)s (default: as long as it takes)",
            )
        if name == "gc":
            action.add_argument(
                "--runs",
                action="append",
                metavar="RUNS",
                help="also remove stores that no run in this folder uses (repeatable)",
            )
            action.add_argument("--delete", action="store_true", help="remove what is listed (default: a dry run)")
