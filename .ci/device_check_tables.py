"""Tables of .ci/device-check's results (standard library only: the GPU machine has no extra packages).

    python3 .ci/device_check_tables.py latency FILE   # dset.profile --json output: p50/p90 per model, precision and
                                                     # mode; each model's best, and its ratio to rtdetr_r18's best
    python3 .ci/device_check_tables.py collect OUT    # every step's results in OUT/device_check.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOALS = {"dset_r18": 1.10, "dset_fast_r18": 0.95}   # issue 23: batch 1, 640 px, each model in its best mode
BASELINE = "rtdetr_r18"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def best_by_model(profiles: list[dict]) -> dict[str, dict]:
    """Each model's fastest timed entry (lowest p50) of its ``inference`` list."""
    best = {}
    for profile in profiles:
        timed = [e for e in profile.get("inference", []) if "latency_ms_p50" in e]
        if timed:
            best[profile["model"]] = min(timed, key=lambda e: e["latency_ms_p50"])
    return best


def latency_table(profiles: list[dict]) -> str:
    rows = [f"{'model':<16}{'batch':>6}  {'precision / mode':<28}{'p50 ms':>9}{'p90 ms':>9}{'images/s':>10}"]
    for profile in profiles:
        for e in profile.get("inference", []):
            what = f"{e['precision']} {e['mode']}"
            if "not_timed" in e:
                rows.append(f"{profile['model']:<16}{e['batch_size']:>6}  {what:<28}not timed: {e['not_timed']}")
            else:
                rows.append(f"{profile['model']:<16}{e['batch_size']:>6}  {what:<28}{e['latency_ms_p50']:>9.2f}"
                            f"{e['latency_ms_p90']:>9.2f}{e['fps']:>10.1f}")
    best = best_by_model(profiles)
    if BASELINE in best:
        base = best[BASELINE]["latency_ms_p50"]
        rows.append(f"best mode of each, against {BASELINE}'s best ({base:.2f} ms):")
        for model, e in best.items():
            ratio = e["latency_ms_p50"] / base
            goal = GOALS.get(model)
            verdict = "" if goal is None else f"  goal <= {goal:.2f}x: {'met' if ratio <= goal else 'NOT met'}"
            rows.append(f"  {model:<16}{e['precision']} {e['mode']:<14}{e['latency_ms_p50']:>8.2f} ms  "
                        f"{ratio:.3f}x{verdict}")
    return "\n".join(rows)


def collect(out: Path) -> dict:
    def text(name: str, tail: int | None = None) -> str | None:
        path = out / name
        return (path.read_text()[-tail:] if tail else path.read_text()) if path.is_file() else None

    bench_train = out / "bench_train.json"
    latency = {name: _lines(out / f"{name}.json") for name in ("latency_b1", "latency_b8")}
    return {
        "summary": (text("device_check_summary.txt") or "").splitlines(),
        "env": text("env.log"),
        "cuda_tests": text("cuda_tests.log", 6000),
        "train_bench": json.loads(bench_train.read_text()) if bench_train.is_file() else None,
        "loader_bench": text("bench_loader.txt"),
        **latency,
        "best_at_batch_1": best_by_model(latency["latency_b1"]),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("latency", "collect"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "latency":
        print(latency_table(_lines(Path(argv[1]))))
    else:
        out = Path(argv[1])
        (out / "device_check.json").write_text(json.dumps(collect(out), indent=1))
        print("wrote", out / "device_check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
