"""Download a public dataset: the official GroupLens archive, md5-checked, resumable, extracted atomically.

    reclora-ds download ml-1m [--to data]                 # -> data/ml-1m/ (prepare.raw_dir: data/ml-1m)
    reclora-ds download ml-25m | ml-latest-small [--to DIR]
    reclora-ds download goodreads                         # prints where to get the files (no stable URL)

A run that is cut short (network, Ctrl-C, kill) leaves only hidden temporaries; the same command resumes
the transfer. An existing ``DIR/<name>`` that is not this command's own complete download is never
overwritten. ``--base-url`` (or ``$RECLORA_DOWNLOAD_BASE_URL``) names a mirror; ``--md5`` the archive's
checksum when it is not the published one (a mirror's own archive). Exit status: 0 done (or already
there), 2 ``error: ...`` (refused destination, network failure, checksum mismatch, bad archive, full disk).
The library call is :func:`reclora_ds.download.download_dataset`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from reclora_ds.download import BASE_URL_ENV, GOODREADS_HELP, SOURCES, DownloadError, download_dataset
from reclora_ds.files import DiskFullError

GOODREADS = "goodreads"
PROGRESS_STEP = 0.1  # log the progress every 10% of a known size


def _progress_logger() -> Callable[[int, int | None], None]:
    shown = {"next": PROGRESS_STEP}

    def report(done: int, total: int | None) -> None:
        if total and done / total >= shown["next"]:
            logging.getLogger("reclora_ds.download").info(
                "%3.0f%% (%s of %s bytes)", 100 * done / total, f"{done:,}", f"{total:,}"
            )
            shown["next"] = (int(done / total / PROGRESS_STEP) + 1) * PROGRESS_STEP

    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reclora-ds download",
        description=__doc__.splitlines()[0],
        epilog=", ".join(f"{s.name}: {s.size}, {s.content}" for s in SOURCES.values()),
    )
    parser.add_argument("name", choices=[*SOURCES, GOODREADS], help="the dataset")
    parser.add_argument(
        "--to", default="data", help="parent folder; the dataset lands in TO/NAME (default: data)"
    )
    parser.add_argument(
        "--base-url", help=f"where the archives are (default: ${BASE_URL_ENV}, else files.grouplens.org)"
    )
    parser.add_argument("--md5", help="the archive's expected md5 (default: the published one)")
    args = parser.parse_args(argv)
    if args.name == GOODREADS:
        print(GOODREADS_HELP)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = download_dataset(
            args.name, args.to, base_url=args.base_url, md5=args.md5, progress=_progress_logger()
        )
    except (DownloadError, DiskFullError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable --to, a read-only file system
        print(f"error: {exc.filename or args.to}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
