"""The copying experiment's claims, with the criteria of simulations/copying/PROTOCOL.md.

Read from the ``copying`` table of the scale being validated: ``full`` is the
pre-registered confirmatory block, ``small`` the development block (its verdicts
describe the data the method was chosen on and are not evidence), ``smoke`` the tests'
toy run. Gains are in % of each clean client's local accuracy, averaged over the clean
clients of a replicate; intervals are paired bootstrap intervals over replicates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._core import INF, Check, wilson

__all__ = ["CHECKS", "MIN_GAIN"]

# The smallest gain that counts (PROTOCOL.md, section 6): 0.1 percentage points, so that
# a method identical to local LoRA (gain 0, interval [0, 0]) cannot pass.
MIN_GAIN = 0.1
_SOURCES = {"gain": "docs/theory.md#c1", "rules": "docs/theory.md#c2",
            "detection": "docs/theory.md#c3", "seeds": "docs/theory.md#c4"}
_DEVELOPMENT_SEEDS = (Path(__file__).resolve().parents[2] / "simulations" / "copying"
                      / "development_seeds.json")


def _analysis():
    from simulations.copying import analysis  # lazily: pandas and scipy

    return analysis


# The gain and rule checks take the paired percentile bootstrap that
# simulations/copying/PROTOCOL.md (section 5) registered for the confirmatory decisions,
# and decide nothing below MIN_BOOTSTRAP_REPLICATES replicates: a review measured the
# percentile interval's coverage at 0.49, 0.74, 0.84, 0.90 and 0.93 for 2, 3, 5, 10 and
# 20 normal replicates (2 000 samples each), and a smoke block's two replicates passed on
# [min, max] (two equal values on a point). The development block (10 per setting) keeps
# its verdicts, at the 0.90 coverage measured there; the confirmatory block has 100.
MIN_BOOTSTRAP_REPLICATES = 10


def _mean_and_interval(values):
    """(mean, low, high): the registered paired bootstrap, or NaN ends (inconclusive)
    below MIN_BOOTSTRAP_REPLICATES replicates."""
    values = np.asarray(values, dtype=float)
    if len(values) < MIN_BOOTSTRAP_REPLICATES:
        mean = float(np.mean(values)) if len(values) else float("nan")
        return mean, float("nan"), float("nan")
    # Equal values give the point interval (the bootstrap's every resample is the point).
    # A review asked for an interval that decides nothing there, as mean_interval gives
    # equal values of a share; it was not taken: a gain is a difference of accuracies,
    # continuous across replicates, so equal values arise only from a structural identity
    # (the local-refinement control: CLAIR's adapters are local LoRA's, gain exactly 0 in
    # every replicate), where the point is the truth, and MIN_GAIN makes it fail; an
    # infinite interval left that control inconclusive (a scratch rerun of its report).
    return _analysis().paired_bootstrap(values)


def _gain(setting):
    def check(df):
        gains = _analysis().replicate_gains(df, setting)
        mean, low, high = _mean_and_interval(gains["clair"])
        return {"statistic": "mean gain of CLAIR over local LoRA (%)", "expected": "> 0",
                "observed": mean, "interval": (low, high), "n": len(gains),
                "detail": f"{setting}: {len(gains)} replicates; CLAIR's rank-r adapters "
                          f"{gains['clair_lora'].mean():+.2f} %"}
    return check


def _beats_rules(setting):
    def check(df):
        analysis = _analysis()
        gains = analysis.replicate_gains(df, setting)
        margins = {rule: _mean_and_interval(gains["clair"] - gains[rule])
                   for rule in analysis.BASELINES if rule in gains}
        if len(margins) < len(analysis.BASELINES):
            missing = sorted(set(analysis.BASELINES) - set(margins))
            raise ValueError(f"rules missing from the table: {missing}")
        closest = min(margins, key=lambda rule: margins[rule][0])
        low = min(m[1] for m in margins.values())
        high = min(m[2] for m in margins.values())
        return {"statistic": "smallest mean margin of CLAIR over a rule (%)",
                "expected": "> 0 for every rule", "observed": margins[closest][0],
                "interval": (low, high), "n": len(gains),
                "detail": f"{setting}: closest rule {closest} "
                          f"({margins[closest][0]:+.2f} [{margins[closest][1]:+.2f}, "
                          f"{margins[closest][2]:+.2f}])"}
    return check


def _clients(df, column_prefix):
    """(kind, flagged) over every client of every replicate."""
    pairs = []
    for row in df.to_dict("records"):
        for k in range(int(row["n_clients"])):
            pairs.append((row[f"kind_c{k}"], bool(row[f"{column_prefix}_c{k}"])))
    return pairs


def false_alarms(df):
    flags = [flagged for kind, flagged in _clients(df, "flagged_clair") if kind == "benign"]
    rate, interval = wilson(sum(flags), len(flags))
    return {"statistic": "share of clean clients flagged", "expected": "<= 0.05",
            "observed": rate, "interval": interval, "n": len(flags)}


def attack_recall(df):
    by_kind = {}
    for kind, flagged in _clients(df, "flagged_clair"):
        if kind != "benign":
            by_kind.setdefault(kind, []).append(flagged)
    rates = {kind: wilson(sum(f), len(f)) for kind, f in by_kind.items()}
    worst = min(rates, key=lambda kind: rates[kind][0])
    return {"statistic": "smallest share of replicates an attack kind is flagged in",
            "expected": ">= 0.8 for every kind", "observed": rates[worst][0],
            "interval": (min(r[1][0] for r in rates.values()),
                         min(r[1][1] for r in rates.values())),
            "n": len(by_kind[worst]),
            "detail": "; ".join(f"{kind} {rate:.3f}" for kind, (rate, _) in
                                sorted(rates.items()))}


#: The confirmatory blocks in the order they were run (simulations/copying/PROTOCOL.md):
#: a later block's seeds must be new to every earlier one.
CONFIRMATORY_BLOCKS = ("confirmatory", "confirmatory-2", "confirmatory-3", "confirmatory-4",
                       "confirmatory-5")


def _block_seeds(block):
    """The seeds of one confirmatory block, as the study's ``full`` scale derives them."""
    from simulations._framework import derive_seed
    from simulations.studies.copying import STUDY, cells

    return {derive_seed(STUDY.name, params, rep)
            for params in cells(block) for rep in range(int(STUDY.replicates["full"]))}


def _used_before(block):
    """The seeds used before ``block``: in development (the recorded seeds, and, for any
    block but the development block itself and the tests' smoke block, the development
    block's), and in every confirmatory block run before it (every registered one for
    a block not in :data:`CONFIRMATORY_BLOCKS`: a sixth block, or a mislabelled one,
    must be new to all of them)."""
    from simulations.studies.copying import STUDY

    development = json.loads(_DEVELOPMENT_SEEDS.read_text())
    used = set(development["framework_seeds"]) | set(development["direct_seeds"])
    if block in ("development", "smoke"):
        return used
    used |= {task[3] for task in STUDY.tasks("small")}  # the development block's
    earlier = (CONFIRMATORY_BLOCKS[:CONFIRMATORY_BLOCKS.index(block)]
               if block in CONFIRMATORY_BLOCKS else CONFIRMATORY_BLOCKS)
    for name in earlier:
        used |= _block_seeds(name)
    return used


def fresh_seeds(df):
    """Seeds of the table also used before it, block by block (:func:`_used_before`): 0
    for a confirmatory block. A review found the development block's seeds checked only
    for the registered block names: relabelled rows of the development block passed as
    a new block with 0 reused seeds."""
    blocks = sorted(set(df["seed_block"]))
    overlap = sum(len(set(df.loc[df["seed_block"] == block, "seed"]) & _used_before(block))
                  for block in blocks)
    development_only = set(blocks) <= {"development", "smoke"}
    return {"statistic": "replicates whose seed was used in development",
            "expected": 0, "observed": overlap, "interval": (overlap, overlap),
            "n": len(df), "detail": f"seed blocks {blocks}" + (
                " (the development block: checked only against the seeds used before it, "
                "so this pass says nothing about a confirmatory block)"
                if development_only else "")}


CHECKS = [
    Check("copying_gain_homogeneous", "copying",
          "CLAIR's default gains over local LoRA in the homogeneous setting",
          _gain("homogeneous"), margin=(MIN_GAIN, INF), source=_SOURCES["gain"]),
    Check("copying_gain_heterogeneous", "copying",
          "CLAIR's default gains over local LoRA in the heterogeneous setting",
          _gain("heterogeneous"), margin=(MIN_GAIN, INF), source=_SOURCES["gain"]),
    Check("copying_beats_rules_homogeneous", "copying",
          "CLAIR's default beats FedAvg, the factor-averaging and the robust rules "
          "(homogeneous)", _beats_rules("homogeneous"), margin=(MIN_GAIN, INF),
          source=_SOURCES["rules"]),
    Check("copying_beats_rules_heterogeneous", "copying",
          "CLAIR's default beats FedAvg, the factor-averaging and the robust rules "
          "(heterogeneous)", _beats_rules("heterogeneous"), margin=(MIN_GAIN, INF),
          source=_SOURCES["rules"]),
    Check("copying_false_alarms", "copying",
          "CLAIR flags at most 5% of the clean clients", false_alarms,
          margin=(-INF, 0.05), source=_SOURCES["detection"]),
    Check("copying_attack_recall", "copying",
          "CLAIR flags every kind of attack in at least 80% of the replicates",
          attack_recall, margin=(0.8, INF), source=_SOURCES["detection"]),
    Check("copying_fresh_seeds", "copying",
          "The confirmatory replicates use seeds never used in development", fresh_seeds,
          kind="identity", margin=(-INF, 0.5), source=_SOURCES["seeds"]),
]
