"""A/B: one benchmark run from two commits, rounds alternating in one session, so both see the same
machine (the base's checkout is a git worktree under ``--work``; the head is this checkout, or
another commit). Every timing in the benchmark's JSON is compared round by round: milliseconds
(lower is better) and per-second rates (higher is better), medians over rounds, and the head's
ratio to the base's; a row more than ``--tolerance`` worse is flagged.

    python benchmarks/ab.py --base 3dd5405 --bench copypaste --rounds 3 -- --images 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checkout(rev: str | None, work: Path) -> Path:
    """This checkout for ``None``, else a worktree of ``rev`` under ``work`` (made once)."""
    if rev is None:
        return REPO
    path = work / f"wt-{rev}"
    if not path.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)
    return path


def run_once(tree: Path, scripts: Path, bench: str, args: list[str], out: Path) -> dict:
    """``scripts``' benchmark with ``tree``'s sos_aug (``PYTHONPATH``), its JSON read back."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1",
           "SOS_AUG_TEST_DATA": os.environ.get("SOS_AUG_TEST_DATA", str(REPO.parent / "shared" / "data"))}
    cmd = [sys.executable, str(scripts / "benchmarks" / f"{bench}.py"), *args, "--json", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def timings(report, prefix: str = "", timed: bool = False) -> dict[str, float]:
    """Every timing leaf of a benchmark's JSON, by its path: keys naming milliseconds or a rate, or
    any number in a table under such a key (``"ms_per_image": {"net": 30.7}``)."""
    out: dict[str, float] = {}
    if isinstance(report, dict):
        for key, value in report.items():
            path = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (timed or kind_of(str(key))):
                out[path] = float(value)
            elif isinstance(value, dict):
                out.update(timings(value, path, timed or kind_of(str(key)) == "time"))
    return out


def kind_of(key: str) -> str | None:
    """``"time"`` for a duration (lower is better), ``"rate"`` for a throughput, else None."""
    if "all_rounds" in key:
        return None
    if "per_s" in key:
        return "rate"
    if key.startswith(("ms", "slowdown")) or key.endswith("_ms") or "ms_per" in key or key in ("composite", "refer"):
        return "time"  # (a slowdown, with over without, is lower-is-better too)
    return None


def compare(base: list[dict], head: list[dict], tolerance: float) -> dict:
    """Per timing leaf: the medians over rounds and the head's change, worse-is-positive."""
    rows = {}
    for path in sorted(set(base[0]) & set(head[0])):
        b = statistics.median(r[path] for r in base if path in r)
        h = statistics.median(r[path] for r in head if path in r)
        better_low = kind_of(path.rsplit("/", 1)[-1]) != "rate"
        worse = (h / b - 1) if better_low else (b / h - 1)
        rows[path] = {"base": round(b, 3), "head": round(h, 3), "worse_by": round(worse, 4),
                      "flag": worse > tolerance}
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--head", help="another commit (default: this checkout as it is)")
    p.add_argument("--bench", required=True, help="benchmarks/BENCH.py, e.g. copypaste, integrations, relight")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=0.03, help="a row this much worse is flagged (default 3%%)")
    p.add_argument("--work", default=str(REPO / "bench_out" / "ab"))
    p.add_argument("--scripts", choices=["own", "head"], default="own",
                   help="each side runs its own benchmark script, or both the head's (when the base's is broken)")
    p.add_argument("--json", help="write the comparison here")
    args = p.parse_args(own)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    trees = {"base": checkout(args.base, work), "head": checkout(args.head, work)}
    reports: dict[str, list[dict]] = {"base": [], "head": []}
    for k in range(args.rounds):
        for side in (("base", "head") if k % 2 == 0 else ("head", "base")):  # alternate who goes first
            scripts = trees[side] if args.scripts == "own" else trees["head"]
            report = run_once(trees[side], scripts, args.bench, extra, work / f"{args.bench}-{side}-{k}.json")
            reports[side].append(timings(report))
            print(f"round {k + 1}/{args.rounds}: {side} done", file=sys.stderr, flush=True)
    rows = compare(reports["base"], reports["head"], args.tolerance)
    machine = report.get("machine", "") if isinstance(report, dict) else ""
    result = {"bench": args.bench, "base": args.base, "head": args.head or "working tree", "rounds": args.rounds,
              "scripts": args.scripts, "args": extra, "machine": machine, "rows": rows}
    width = max((len(r) for r in rows), default=10)
    print(f"{'row':{width}s} {'base':>10s} {'head':>10s} {'worse by':>9s}")
    for path, r in rows.items():
        print(f"{path:{width}s} {r['base']:10.3f} {r['head']:10.3f} {100 * r['worse_by']:8.1f}%" +
              ("  <- slower" if r["flag"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
