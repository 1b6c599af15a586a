"""Post hoc: the predictive LoRA null's effect on the copying study's client flags,
replicate by replicate on the third confirmatory block's seeds.

The third confirmatory block (`simulations/results/archive/copying_full_confirmatory3_clip.jsonl`)
was run with the LoRA null before the predictive one; the fourth (amendment 5 of
`simulations/copying/PROTOCOL.md`) with it, on other seeds, and flagged the backdoor less
often (0.82 against 0.93). Blocks differ in seeds as well as in the null. This script
reruns a random subset of the third block's replicates (the same seeds, cells and base
model) with the current code and compares each client's flag and CLAIR's accuracy with
the stored ones, so that the null's share of the difference is measured on the same
replicates. Not part of the protocol (run after the fourth block was seen).

Rows go to ``benchmarks/results/copying_null_paired.jsonl`` (resumable: replicates
already there are skipped). Usage (about 15 s per replicate on one core):

    OMP_NUM_THREADS=1 python benchmarks/copying_null_paired.py --replicates 40
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time
import warnings

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLOCK = ROOT / "simulations" / "results" / "archive" / "copying_full_confirmatory3_clip.jsonl"
OUT = ROOT / "benchmarks" / "results" / "copying_null_paired.jsonl"


def main(argv=None):
    import clairstat
    from simulations.studies.copying import cells, simulate_one

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="of the random subset")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in BLOCK.read_text().splitlines()]
    pick = np.random.default_rng(args.seed).choice(len(rows), size=args.replicates,
                                                   replace=False)
    done = set()
    if OUT.exists():
        done = {json.loads(line)["seed"] for line in OUT.read_text().splitlines()}
    cell = {c["setting"]: c for c in cells("confirmatory-3")}
    with OUT.open("a") as out:
        for i in pick:
            row = rows[int(i)]
            if row["seed"] in done:
                continue
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                new = simulate_one(cell[row["setting"]], row["seed"])
            n = row["n_clients"]
            out.write(json.dumps({
                "setting": row["setting"], "seed": row["seed"],
                "kinds": [row[f"kind_c{k}"] for k in range(n)],
                "stored": [bool(row[f"flagged_clair_c{k}"]) for k in range(n)],
                "rerun": [bool(new[f"flagged_clair_c{k}"]) for k in range(n)],
                "stored_acc": row["acc_clair"], "rerun_acc": new["acc_clair"],
                "stored_commit": row.get("code_commit"),
                "clairstat_version": clairstat.__version__,
                "seconds": time.perf_counter() - start}) + "\n")
            out.flush()
    report()


def report():
    from statsmodels.stats.proportion import proportion_confint

    rows = [json.loads(line) for line in OUT.read_text().splitlines()]
    counts = collections.Counter()
    for r in rows:
        for kind, old, new in zip(r["kinds"], r["stored"], r["rerun"]):
            counts[kind, old, new] += 1
    print(f"{len(rows)} replicates of the third block rerun\n")
    print("| client kind | flagged, stored (previous null) | flagged, rerun (predictive) "
          "| flag lost | flag gained |")
    print("|---|---|---|---|---|")
    for kind in ("backdoor", "random", "reverse", "adversarial", "benign"):
        total = sum(v for (k, _, _), v in counts.items() if k == kind)
        if not total:
            continue
        old = sum(v for (k, o, _), v in counts.items() if k == kind and o)
        new = sum(v for (k, _, n), v in counts.items() if k == kind and n)

        def share(x):
            lo, hi = proportion_confint(x, total, method="wilson")
            return f"{x} of {total} ({x / total:.2f} [{lo:.2f}, {hi:.2f}])"

        print(f"| {kind} | {share(old)} | {share(new)} | {counts[kind, True, False]} | "
              f"{counts[kind, False, True]} |")
    diff = np.array([r["rerun_acc"] - r["stored_acc"] for r in rows])
    print(f"\nCLAIR's mean accuracy, rerun minus stored: mean {diff.mean():+.5f}, largest "
          f"|difference| {np.abs(diff).max():.5f}")


if __name__ == "__main__":
    main()
