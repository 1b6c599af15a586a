"""Post hoc: the copying comparison's robust rules configured less conservatively.

The pre-registered copying comparison (``simulations/copying/PROTOCOL.md``) runs Krum as
Blanchard et al.'s single selection (m = 1, f = (K - 3) // 2) and the trimmed mean at its
default trim of 0.1, below the share of contaminated clients (4 of 16). A review asked
whether "CLAIR beats every rule" survives rules configured for that share. This script
refits the clients of stored copying replicates from their seeds (the same fine-tuned
adapters the table's rows were computed from: local LoRA's accuracy and the gains of
CLAIR and the registered Krum and trimmed mean are recomputed and must come within a
few test tokens of the stored ones, :func:`reproduces`) and scores, on the same test
batch, multi-Krum (averaging the m most central updates) and a trimmed mean at 0.25,
against CLAIR's default.

The rules were chosen after the fourth confirmatory block was seen, on the development
replicates (``--block small``, ``simulations/results/small/copying.jsonl``), so a
difference there is exploratory. ``--block full`` scores them on the fifth confirmatory
block's replicates (``full/copying.jsonl``), on which no multi-Krum had been computed:
that run, its configurations and its decision rule (:func:`decision`) were fixed before
it by ``simulations/copying/PROTOCOL.md``, amendment 8. Rows go to
``benchmarks/results/copying_multikrum.jsonl`` (one per block, setting and replicate,
with the package version; resumable), and the script prints per setting the mean gain
over local LoRA (percent, benign clients) of each rule and CLAIR's paired margin over it
with a bootstrap 95% interval. CLAIR is the current code's (its stored gain, where the
table predates a change to the detection, is kept beside it in each row).

    OMP_NUM_THREADS=1 python benchmarks/copying_multikrum.py --block small
    OMP_NUM_THREADS=1 python benchmarks/copying_multikrum.py --block full --replicates 20
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

OUT = ROOT / "benchmarks" / "results" / "copying_multikrum.jsonl"
PARAMS = ["pretrain_steps", "d_model", "n_layers", "n_heads", "n_content", "n_clients",
          "n_contaminated", "contamination", "adversarial_scale", "n_moved", "rank",
          "lora_alpha", "mlp", "n_train", "steps", "batch_size", "lr", "n_test",
          "fedrot_lam", "clair_rank", "test_level", "setting", "n_variants"]
RULES = {"krum (as registered)": ("krum", {}),
         "trimmed_mean (as registered)": ("trimmed_mean", {"trim": 0.1}),
         "multikrum_f4_m12": ("krum", {"n_byzantine": 4, "multi": 12}),
         "multikrum_m10": ("krum", {"multi": 10}),
         "trimmed_mean_0.25": ("trimmed_mean", {"trim": 0.25})}


def _gain(accuracy, local, benign):
    return 100.0 * float(np.mean((accuracy[benign] - local[benign]) / local[benign]))


def run_one(row):
    """The rules' gains on the replicate ``row`` describes (its fine-tuning redone)."""
    import torch

    from clairstat import __version__
    from clairstat.lora import aggregate_adapters, module_factors
    from simulations.copying.methods import _broadcast, _clair, _local
    from simulations.copying.replicate import _evaluate, _finetune_all, base_and_tasks

    torch.set_num_threads(1)
    seed, start = row["seed"], time.perf_counter()
    params, model, _, specs, contaminated, _ = base_and_tasks(
        {key: row[key] for key in PARAMS}, seed)
    adapters, _, config = _finetune_all(model, specs, params, seed)
    n_clients = len(adapters)
    updates = {"local": _local(module_factors(adapters, config)),
               "clair": _clair(adapters, config, test_level=params["test_level"],
                               random_state=seed)[1]}
    for name, (rule, options) in RULES.items():
        updates[name] = _broadcast(aggregate_adapters(rule, adapters, config, **options),
                                   n_clients)
    accuracy = _evaluate(model, updates, specs, contaminated, params, seed)
    benign = ~np.asarray(contaminated, dtype=bool)
    gains = {name: _gain(acc, accuracy["local"], benign) for name, acc in accuracy.items()
             if name != "local"}
    from simulations._framework import code_provenance

    return {"setting": row["setting"], "replicate": row["replicate"], "seed": seed,
            "clairstat_version": __version__, "code_commit": code_provenance(),
            "gains": gains,
            "acc_local": float(np.mean(accuracy["local"][benign])),
            "stored_acc_local": float(row["acc_local"]),
            "stored": {"clair": 100.0 * row["rel_clair"],
                       "krum (as registered)": 100.0 * row["rel_krum"],
                       "trimmed_mean (as registered)": 100.0 * row["rel_trimmed_mean"]},
            "seconds": time.perf_counter() - start}


def reproduces(row, result):
    """Whether ``result`` (a row of this script) is the stored table's ``row`` refitted:
    the same seed, the gains of :data:`REPRODUCED` within :data:`REPRODUCED_POINTS`
    points, and local LoRA's mean accuracy within :data:`REPRODUCED_ACCURACY` where the
    result records it (rows scored before 2026-12-05's second erratum do not)."""
    if row["seed"] != result["seed"]:
        return False
    if any(abs(100.0 * row[column] - result["gains"][name]) > REPRODUCED_POINTS
           for name, column in REPRODUCED.items()):
        return False
    return ("acc_local" not in result
            or abs(result["acc_local"] - row["acc_local"]) <= REPRODUCED_ACCURACY)


def _interval(values):
    """The protocol's paired bootstrap (section 5: percentile, 10 000 resamples, its
    fixed generator seed); runs before 2026-12-05 printed scipy's BCa interval with 9 999
    resamples instead."""
    from simulations.copying.analysis import paired_bootstrap

    _, low, high = paired_bootstrap(values)
    return low, high


#: The refit is the table's replicate when local LoRA's mean accuracy over the benign
#: clients is within REPRODUCED_ACCURACY of the stored one and the gains of CLAIR and of
#: the registered Krum and trimmed mean within REPRODUCED_POINTS (percentage points).
#: Nothing here reproduces bit for bit on another machine: the forward passes and the
#: rules' products B A go through BLAS, whose last bits depend on the kernel the
#: machine dispatches, and a test token whose argmax sits near a tie then flips (one
#: token of one client moves the benign mean accuracy by about 2e-5). On the fifth
#: block: local accuracy 2.3e-5 (one token), CLAIR 0.0026 points, Krum 0.010, the
#: trimmed mean 0.00075 and 0.030 (PROTOCOL.md, amendment 8's errata). Another
#: fine-tuning moves the mean accuracy by about 1e-2 and the gains by points (on the
#: fifth block, standard deviations 0.010-0.012 and 0.8-1.2 points): no two of its
#: replicates of a setting (9 900 pairs) are within 1e-3 (about 40 tokens) in accuracy
#: and 0.1 points (the smallest difference the protocol counts) in all three gains.
#: Every row keeps its refit and stored values, so the gaps are on record.
REPRODUCED = {"clair": "rel_clair", "krum (as registered)": "rel_krum",
              "trimmed_mean (as registered)": "rel_trimmed_mean"}
REPRODUCED_POINTS = 0.1
REPRODUCED_ACCURACY = 1e-3


#: PROTOCOL.md amendment 8: the smallest difference in points that counts (section 6's).
MIN_POINTS = 0.1


def decision(low, high):
    """Amendment 8's verdict on CLAIR minus a rule from its interval: "ahead" when it lies
    in [MIN_POINTS, inf), "behind" in (-inf, -MIN_POINTS], else "undecided"."""
    if low >= MIN_POINTS:
        return "ahead"
    if high <= -MIN_POINTS:
        return "behind"
    return "undecided"


def summary(rows):
    """Per block, setting and rule: replicates, the rule's and CLAIR's mean gains (%),
    CLAIR minus the rule (mean and the protocol's paired bootstrap interval, points),
    the replicates where CLAIR is below, and :func:`decision`'s verdict (a list of
    dicts, in the order of :data:`RULES`)."""
    records = []
    for (block, setting) in sorted({(r["block"], r["setting"]) for r in rows}):
        sub = [r for r in rows if r["block"] == block and r["setting"] == setting]
        clair = np.array([r["gains"]["clair"] for r in sub])
        for name in RULES:
            rule = np.array([r["gains"][name] for r in sub])
            diff = clair - rule
            low, high = _interval(diff)
            records.append({"block": block, "setting": setting, "replicates": len(sub),
                            "rule": name, "rule_gain": float(rule.mean()),
                            "clair_gain": float(clair.mean()), "diff": float(diff.mean()),
                            "low": low, "high": high, "below": int((diff < 0).sum()),
                            "verdict": decision(low, high)})
    return records


def table(rows):
    lines = ["| block | setting | replicates | rule | rule's gain (%) | CLAIR's gain (%) | "
             "CLAIR minus rule [95% bootstrap] | replicates CLAIR below | amendment 8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary(rows):
        lines.append(f"| {r['block']} | {r['setting']} | {r['replicates']} | {r['rule']} | "
                     f"{r['rule_gain']:.2f} | {r['clair_gain']:.2f} | {r['diff']:+.2f} "
                     f"[{r['low']:+.2f}, {r['high']:+.2f}] | {r['below']} | {r['verdict']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", choices=("small", "full"), default="small")
    parser.add_argument("--replicates", type=int, default=None,
                        help="the first N replicates of each setting (default: all)")
    args = parser.parse_args(argv)
    stored = [json.loads(line) for line in
              (ROOT / "simulations" / "results" / args.block / "copying.jsonl")
              .read_text().splitlines() if line]
    if args.replicates is not None:
        stored = [r for r in stored if r["replicate"] < args.replicates]
    done = ([json.loads(line) for line in OUT.read_text().splitlines() if line]
            if OUT.exists() else [])
    # A stored result is reused only while the table's replicate gives what it computed
    # (same seed, the same gains for the registered rules and for CLAIR): a rerun table,
    # or a table of other code, is scored again.
    current = {(args.block, r["setting"], r["replicate"]): r for r in stored}

    def still_valid(result):
        row = current.get((result["block"], result["setting"], result["replicate"]))
        return row is None or reproduces(row, result)

    done = [r for r in done if still_valid(r)]
    have = {(r["block"], r["setting"], r["replicate"]) for r in done}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "a") as handle:
        for row in sorted(stored, key=lambda r: (r["replicate"], r["setting"])):
            if (args.block, row["setting"], row["replicate"]) in have:
                continue
            result = {"block": args.block, **run_one(row)}
            if not reproduces(row, result):
                gaps = {name: abs(result["gains"][name] - result["stored"][name])
                        for name in REPRODUCED}
                gaps["local LoRA's accuracy"] = abs(result["acc_local"] - row["acc_local"])
                raise RuntimeError(
                    f"{row['setting']} replicate {row['replicate']}: the refit differs "
                    f"from the table ({gaps}): it is not the table's replicate (the "
                    "fine-tuning or the base model changed).")
            handle.write(json.dumps(result) + "\n")
            handle.flush()
            done.append(result)
            print(f"  {args.block} {row['setting']} replicate {row['replicate']}: "
                  f"{result['seconds']:.1f} s", flush=True)
    wanted = {(args.block, r["setting"], r["replicate"]) for r in stored}
    print(table([r for r in done if (r["block"], r["setting"], r["replicate"]) in wanted]))


if __name__ == "__main__":
    main()
