"""Benchmark stage 0 (``prepare_dataset``) on SYNTHETIC ML-25M-size data against its targets.

    python benchmarks/bench_prepare.py                    # 25,000,095 rows (ML-25M's size) + pandas on 2.5M
    python benchmarks/bench_prepare.py --rows 1000000     # quick check (users and items scaled)
    python benchmarks/bench_prepare.py --skip-pandas

1. Generate (or reuse, keyed by rows/users/items/seed) a synthetic raw folder in the ML-25M layout
   (``reclora_ds.data.synthetic``: made-up ratings, real schema and shapes) under ``--work-dir``.
2. Run ``prepare_dataset`` end to end on it in a child process; its wall time (process start to exit,
   imports included) and peak RSS (``os.wait4`` rusage of that child alone) are checked against the
   targets: <= 5 minutes and <= 6 GB (6e9 bytes). The child also samples its RSS every 0.1 s, which
   gives each stage's (read / process / write) peak.
3. Take the first ``--pandas-rows`` (2,500,000) rows and time, each in its own child, the plain pandas
   reference (``benchmarks/pandas_reference.py``) and ``prepare_dataset`` on exactly those rows: rows/s of
   each and the ratio (reclora_ds rows/s / pandas rows/s).
4. Print the history storage figures from metadata.json (per-user timelines vs 60 copied ids + ratings
   per sample), a table of everything, and write it all to ``<work-dir>/bench_prepare.json``.

The machine's load average is recorded before and after: on a shared machine, timings move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from reclora_ds.data.synthetic import (
    ML25M_RATINGS,
    SyntheticConfig,
    existing_synthetic,
    scaled_config,
    write_synthetic_ml25m,
)

TARGET_SECONDS = 300.0
TARGET_RSS_BYTES = 6 * 10**9
PANDAS_ROWS = 2_500_000
HERE = Path(__file__).resolve().parent
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------
# Child side: run prepare_dataset and report
# ----------------------------------------------------------------------------------------------------------


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds in a daemon thread."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, self._rss()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_between(self, lo: float, hi: float) -> int:
        inside = [rss for t, rss in self.samples if lo <= t <= hi]
        return max(inside, default=0)


def child_prepare(raw_dir: Path, out_dir: Path, result_path: Path) -> int:
    from reclora_ds.data.config import PrepareConfig
    from reclora_ds.data.prepare import prepare_dataset

    cfg = PrepareConfig(dataset="ml-25m", raw_dir=str(raw_dir), output_dir=str(out_dir))
    with RssSampler() as sampler:
        result = prepare_dataset(cfg)
    t = result.timings
    edges = {"read": (0.0, t["read"])}
    edges["process"] = (t["read"], t["read"] + t["process"])
    edges["write"] = (edges["process"][1], edges["process"][1] + t["write"])
    m = result.metadata
    report = {
        "timings": t,
        "stage_peak_rss_bytes": {k: sampler.peak_between(*v) for k, v in edges.items()},
        "counts": m["counts"],
        "splits": {k: v["rows"] for k, v in m["splits"].items()},
        "drops": {k: v["count"] for k, v in m["drops"].items()},
        "history_storage": m["history_storage"],
        "summary": result.summary(),
    }
    result_path.write_text(json.dumps(report, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------------


def run_child(cmd: list[str], result_path: Path, label: str) -> dict[str, Any]:
    """Run ``cmd``; its wall time and its own peak RSS (wait4 rusage of this child only) + its JSON."""
    result_path.unlink(missing_ok=True)
    print(f"[bench] {label}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    if proc.returncode != 0:
        raise SystemExit(f"[bench] {label} failed with exit code {proc.returncode}")
    out = json.loads(result_path.read_text())
    out["wall_s"] = wall
    out["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    out["cpu_s"] = usage.ru_utime + usage.ru_stime
    print(f"[bench] {label}: {wall:.1f} s wall, peak RSS {out['peak_rss_bytes'] / MIB:,.0f} MiB", flush=True)
    return out


def prepare_cmd(raw: Path, out: Path, result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child-prepare", str(raw), str(out), str(result)]


def ensure_synthetic(work: Path, cfg: SyntheticConfig) -> tuple[Path, float | None]:
    raw = work / "raw" / f"ml25m-synth-{cfg.key()}"
    if existing_synthetic(raw, cfg):
        print(f"[bench] reusing synthetic data in {raw}", flush=True)
        return raw, None
    print(f"[bench] generating synthetic data ({cfg.rows:,} rows) in {raw}", flush=True)
    result = write_synthetic_ml25m(raw, cfg)
    return raw, result.seconds


def ensure_head(raw: Path, rows: int) -> Path:
    """``raw``'s movies.csv and the first ``rows`` data rows of its ratings.csv, in a sibling folder."""
    head = raw.with_name(f"{raw.name}-head{rows}")
    marker = head / "head.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"source": raw.name, "rows": rows}:
        return head
    head.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    shutil.copyfile(raw / "movies.csv", head / "movies.csv")
    with open(raw / "ratings.csv", "rb") as src, open(head / "ratings.csv", "wb") as dst:
        dst.write(src.readline())
        for _ in range(rows):
            line = src.readline()
            if not line:
                break
            dst.write(line)
    marker.write_text(json.dumps({"source": raw.name, "rows": rows}))
    return head


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(report: dict[str, Any]) -> str:
    full = report["full"]
    lines = [
        "",
        f"=== prepare_dataset on SYNTHETIC ML-25M-layout data: {report['rows']:,} rows, "
        f"{report['users']:,} users, {report['items']:,} items (seed {report['seed']}) ===",
        f"machine: {report['cpus']} CPUs, load average before {report['load_before']}, "
        f"after {report['load_after']}",
    ]
    if report.get("generate_s") is not None:
        lines.append(f"synthetic data generated in {report['generate_s']:.1f} s")
    lines += [
        "",
        f"{'run':<26}{'rows':>13}{'wall s':>10}{'cpu s':>10}{'peak RSS MiB':>15}{'rows/s':>13}",
    ]

    def row(name: str, r: dict[str, Any], rows: int) -> str:
        return (
            f"{name:<26}{rows:>13,}{r['wall_s']:>10.1f}{r['cpu_s']:>10.1f}"
            f"{r['peak_rss_bytes'] / MIB:>15,.0f}{rows / r['wall_s']:>13,.0f}"
        )

    lines.append(row("reclora_ds (all rows)", full, report["rows"]))
    head = report.get("head")
    if head:
        lines.append(row("reclora_ds (head)", head["reclora_ds"], head["rows"]))
        if head.get("pandas"):
            lines.append(row("pandas reference (head)", head["pandas"], head["rows"]))
    t = full["timings"]
    peaks = full["stage_peak_rss_bytes"]
    lines += [
        "",
        "targets (all rows): wall <= 300 s: "
        f"{full['wall_s']:.1f} s {verdict(full['wall_s'] <= TARGET_SECONDS)};  peak RSS <= 6 GB: "
        f"{full['peak_rss_bytes'] / 1e9:.2f} GB {verdict(full['peak_rss_bytes'] <= TARGET_RSS_BYTES)}",
        "stages (in-process): "
        + ", ".join(
            f"{k} {t[k]:.1f} s (peak {peaks[k] / MIB:,.0f} MiB)" for k in ("read", "process", "write")
        )
        + f"; total {t['total']:.1f} s; start-up + imports {full['wall_s'] - t['total']:.1f} s",
    ]
    if head and head.get("pandas"):
        ours, pandas = head["reclora_ds"], head["pandas"]
        ratio = pandas["wall_s"] / ours["wall_s"]
        pt = pandas["timings"]
        ot = ours["timings"]
        lines += [
            f"pandas reference stages: read {pt['read']:.1f} s, process {pt['process']:.1f} s, "
            f"write {pt['write']:.1f} s",
            f"reclora_ds head stages:  read {ot['read']:.1f} s, process {ot['process']:.1f} s, "
            f"write {ot['write']:.1f} s",
            f"speed ratio on the same {head['rows']:,} rows (reclora_ds rows/s / pandas rows/s): {ratio:.1f}x "
            f"(in-process totals: {pt['total'] / ot['total']:.1f}x)",
            f"same samples: reclora_ds {ours['counts']['samples']:,} vs pandas {pandas['samples']:,}; "
            f"splits {ours['splits']['train']:,}/{ours['splits']['valid']:,}/{ours['splits']['test']:,} vs "
            f"{pandas['splits']['train']:,}/{pandas['splits']['valid']:,}/{pandas['splits']['test']:,}",
        ]
    h = full["history_storage"]
    lines += [
        f"history storage (all rows): timelines {h['timeline_bytes'] / MIB:,.1f} MiB vs "
        f"{h['copied_bytes'] / MIB:,.1f} MiB for 60 copied ids + ratings per sample ({h['ratio']:.1f}x smaller)",
        "",
        "prepare_dataset summary (all rows):",
        full["summary"],
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/reclora_bench"))
    ap.add_argument("--rows", type=int, default=ML25M_RATINGS, help="rows of the synthetic set")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic set")
    ap.add_argument("--pandas-rows", type=int, default=PANDAS_ROWS, help="rows of the pandas comparison")
    ap.add_argument("--skip-pandas", action="store_true", help="skip the pandas reference and the head run")
    ap.add_argument("--child-prepare", nargs=3, metavar=("RAW", "OUT", "RESULT"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_prepare:
        return child_prepare(*map(Path, args.child_prepare))

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    cfg = scaled_config(args.rows, args.seed)
    report: dict[str, Any] = {
        "rows": cfg.rows,
        "users": cfg.users,
        "items": cfg.items,
        "seed": cfg.seed,
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "targets": {"wall_s": TARGET_SECONDS, "peak_rss_bytes": TARGET_RSS_BYTES},
    }
    raw, report["generate_s"] = ensure_synthetic(work, cfg)
    report["raw_dir"] = str(raw)

    results = work / "results"
    results.mkdir(exist_ok=True)
    report["full"] = run_child(
        prepare_cmd(raw, work / "out" / "reclora_full", results / "full.json"),
        results / "full.json",
        "reclora_ds prepare, all rows",
    )
    if not args.skip_pandas:
        n = min(args.pandas_rows, cfg.rows)
        head_dir = raw if n == cfg.rows else ensure_head(raw, n)
        report["head"] = {"rows": n, "raw_dir": str(head_dir)}
        report["head"]["pandas"] = run_child(
            [
                sys.executable,
                str(HERE / "pandas_reference.py"),
                "--raw",
                str(head_dir),
                "--out",
                str(work / "out" / "pandas_head"),
                "--result",
                str(results / "pandas_head.json"),
            ],
            results / "pandas_head.json",
            f"pandas reference, first {n:,} rows",
        )
        report["head"]["reclora_ds"] = (
            report["full"]
            if head_dir == raw
            else run_child(
                prepare_cmd(head_dir, work / "out" / "reclora_head", results / "reclora_head.json"),
                results / "reclora_head.json",
                f"reclora_ds prepare, first {n:,} rows",
            )
        )
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["table"] = render(report)
    print(report["table"])
    (work / "bench_prepare.json").write_text(json.dumps(report, indent=2))
    print(f"\n[bench] wrote {work / 'bench_prepare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
