"""How often the per-module detection cycles in the copying experiment, and what its
resolution does to the client flags (exploratory, development seeds).

Each module's refit-and-test loop stops when the set of kept clients repeats; on a
cycle the collaborative set is every client some round of the cycle kept
(``docs/method_notes.md``, section 8, "One consistent fit"), so a client the final test
rejects may be kept and then counts as not flagged in that module's vote
(:func:`clairstat.aggregation.client_flags`). This script fine-tunes the clients of
``copying_flagged``'s development replicates (``--scale small`` seeds, never the
pre-registered ones) and refits CLAIR's default on them (the same fit as the study's
clipping policy: the flags do not depend on the stand-in), and records per replicate:
how many of the module fits did not converge, how many (module, client) pairs are kept
although the final test rejects them, split into attackers and clean clients, and the
client-level recall and false alarms under the package's flags and under the
alternative that counts a final-test rejection as a module flag (the vote rule
unchanged). Nothing in the package is changed by it.

Rows go to ``benchmarks/results/copying_cycles.jsonl`` (one per replicate, with the
package version and the code's commit; resumable); the script prints per cell the
shares with Wilson intervals.

    OMP_NUM_THREADS=1 python benchmarks/copying_cycles.py [--replicates N]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results" / "copying_cycles.jsonl"


def run_one(params, seed):
    """One replicate's module fits: convergence, kept-but-rejected pairs, both flags."""
    import torch

    from clairstat import __version__
    from clairstat.aggregation import client_flags
    from clairstat.lora import refine_adapters
    from simulations._framework import code_provenance
    from simulations.copying.replicate import _finetune_all, base_and_tasks

    torch.set_num_threads(1)
    start = time.perf_counter()
    params, model, _, specs, contaminated, _ = base_and_tasks(params, seed)
    adapters, _, config = _finetune_all(model, specs, params, seed)
    level = params["test_level"]
    fit = refine_adapters(adapters, config, test_level=level, random_state=seed)
    contaminated = np.asarray(contaminated, dtype=bool)
    fitted = {name: est for name, est in fit.estimators.items() if est is not None}
    own, rejected, converged = [], [], []
    for name, est in fitted.items():
        flags = np.asarray(fit.module_flagged[name], dtype=bool)
        rejects = np.asarray(est.adjusted_p_values_) <= level  # the final test's
        if not np.array_equal(flags, np.asarray(est.contaminated_, dtype=bool)):
            raise RuntimeError(f"{name}: the module's flags are not its estimator's")
        if est.detection_converged_ and not np.array_equal(flags, rejects):
            # a loop that settled keeps exactly what its final test keeps: the reading
            # of adjusted_p_values_ <= level as "rejected" is then the flags themselves
            raise RuntimeError(f"{name}: converged, yet its flags are not its final "
                               "test's rejections")
        own.append(flags)
        rejected.append(flags | rejects)
        converged.append(bool(est.detection_converged_))
    own, rejected = np.array(own), np.array(rejected)
    kept_rejected = rejected & ~own  # (module, client): the final test rejects, kept
    alternative = client_flags(rejected, level)

    def scores(flags):
        return {"recall": float(flags[contaminated].mean()),
                "false_alarms": int(flags[~contaminated].sum())}

    return {"n_clients": int(params["n_clients"]), "setting": params["setting"],
            "seed": seed, "clairstat_version": __version__,
            "code_commit": code_provenance(), "modules": len(fitted),
            "not_converged": int(len(converged) - sum(converged)),
            "kept_rejected_attacker": int(kept_rejected[:, contaminated].sum()),
            "kept_rejected_clean": int(kept_rejected[:, ~contaminated].sum()),
            "clean": int((~contaminated).sum()), "attackers": int(contaminated.sum()),
            "package": scores(np.asarray(fit.flagged, dtype=bool)),
            "rejections_count": scores(alternative),
            "seconds": time.perf_counter() - start}


def _wilson(successes, trials):
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, trials, alpha=0.05, method="wilson")
    return f"{successes / trials:.3f} [{low:.3f}, {high:.3f}]"


def table(rows):
    lines = ["| cell | replicates | module fits not converged | attacker pairs kept though "
             "rejected | clean pairs kept though rejected | recall (package) | recall "
             "(rejections count) | clean clients flagged (package) | clean clients flagged "
             "(rejections count) |", "|---|---|---|---|---|---|---|---|---|"]
    cells = sorted({(r["setting"], r["n_clients"]) for r in rows})
    for setting, n_clients in cells:
        sub = [r for r in rows if (r["setting"], r["n_clients"]) == (setting, n_clients)]
        fits = sum(r["modules"] for r in sub)
        attacker_pairs = sum(r["modules"] * r["attackers"] for r in sub)
        clean_pairs = sum(r["modules"] * r["clean"] for r in sub)
        attackers = sum(r["attackers"] for r in sub)
        clean = sum(r["clean"] for r in sub)
        found = {rule: round(sum(r[rule]["recall"] * r["attackers"] for r in sub))
                 for rule in ("package", "rejections_count")}
        alarms = {rule: sum(r[rule]["false_alarms"] for r in sub)
                  for rule in ("package", "rejections_count")}
        lines.append(
            f"| {setting}, {n_clients} clients | {len(sub)} | "
            f"{_wilson(sum(r['not_converged'] for r in sub), fits)} | "
            f"{_wilson(sum(r['kept_rejected_attacker'] for r in sub), attacker_pairs)} | "
            f"{_wilson(sum(r['kept_rejected_clean'] for r in sub), clean_pairs)} | "
            f"{_wilson(found['package'], attackers)} | "
            f"{_wilson(found['rejections_count'], attackers)} | "
            f"{_wilson(alarms['package'], clean)} | "
            f"{_wilson(alarms['rejections_count'], clean)} |")
    return "\n".join(lines)


def main(argv=None):
    from simulations import get_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=None,
                        help="the first N replicates of each cell (default: the study's)")
    args = parser.parse_args(argv)
    study = get_study("copying_flagged")
    tasks = [(cell, rep, params, seed) for cell, rep, params, seed in study.tasks("small")
             if args.replicates is None or rep < args.replicates]
    done = ([json.loads(line) for line in OUT.read_text().splitlines() if line]
            if OUT.exists() else [])
    have = {row["seed"] for row in done}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "a") as handle:
        for cell, rep, params, seed in tasks:
            if seed in have:
                continue
            row = {"cell": cell, "replicate": rep, **run_one(dict(params), seed)}
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            done.append(row)
            print(f"  {params['setting']} {params['n_clients']} clients replicate {rep}: "
                  f"{row['not_converged']} of {row['modules']} fits not converged, "
                  f"{row['seconds']:.1f} s", flush=True)
    wanted = {seed for *_, seed in tasks}
    print(table([row for row in done if row["seed"] in wanted]))


if __name__ == "__main__":
    main()
