"""The main job on an embedded default: ``python -m clairstat.demo``.

Generates a federated multivariate regression (K = 40 clients, p = 30, q = 8, rank 3,
n = 200 samples each, 8 contaminated), fits CLAIR, prints a short report and writes a
figure (contamination scores with the threshold; singular values of L_hat).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from . import CLAIREstimator, __version__
from .datasets import make_federated_regression
from .metrics import detection_scores, estimation_errors, subspace_distance

DEFAULTS = dict(n_clients=40, p=30, q=8, rank=3, n_samples=200, n_contaminated=8)


def run(output_dir, *, seed=0, solver="auto", **overrides):
    """Fit the demo case and write ``report.md`` and ``demo.png`` to ``output_dir``.

    Returns
    -------
    dict
        The numbers of the report.
    """
    params = {**DEFAULTS, **overrides}
    data = make_federated_regression(**params, random_state=seed)
    start = time.perf_counter()
    est = CLAIREstimator(solver=solver, random_state=seed).fit(
        data.local_estimates, sample_weight=data.n_samples)
    elapsed = time.perf_counter() - start
    benign = ~data.contaminated
    numbers = {
        "params": params, "seed": seed, "version": __version__,
        "flagged": np.flatnonzero(est.contaminated_).tolist(),
        "truly_contaminated": np.flatnonzero(data.contaminated).tolist(),
        **detection_scores(est.contaminated_, data.contaminated),
        "subspace_error": subspace_distance(est.subspace_, data.subspace),
        "rank": est.rank_,
        "refined_error": float(estimation_errors(est.refined_, data.truth)[benign].mean()),
        "ols_error": float(estimation_errors(data.local_estimates, data.truth)[benign].mean()),
        "solver": est.solver_, "iterations": est.n_iter_, "dual_gap": est.dual_gap_,
        "relative_gap": est.decomposition_.relative_gap, "seconds": elapsed,
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    numbers["figure"] = str(_figure(est, data, output_dir / "demo.png"))
    report = _report(numbers, est)
    (output_dir / "report.md").write_text(report)
    numbers["report"] = report
    return numbers


def _report(n, est):
    p = n["params"]
    return "\n".join([
        f"# clairstat {n['version']} demo",
        f"K = {p['n_clients']} clients, p = {p['p']}, q = {p['q']}, rank {p['rank']}, "
        f"n = {p['n_samples']} samples each, {p['n_contaminated']} contaminated (seed {n['seed']}).",
        "",
        f"- flagged clients:      {n['flagged']}",
        f"- truly contaminated:   {n['truly_contaminated']}",
        f"- precision {n['precision']:.2f}, recall {n['recall']:.2f}, exact: {n['exact']}",
        f"- shared subspace: rank {n['rank']}, ||P_hat - P*||_F = {n['subspace_error']:.4f}",
        f"- benign clients' mean squared error: refined {n['refined_error']:.4f} vs local "
        f"OLS {n['ols_error']:.4f} (ratio {n['refined_error'] / n['ols_error']:.3f})",
        f"- solver {n['solver']}: {n['iterations']} iterations, duality gap "
        f"{n['dual_gap']:.2e} (relative {n['relative_gap']:.1e}), {n['seconds']:.2f} s",
        f"- figure: {n['figure']}",
        "",
        "## Fit summary",
        "",
        est.summary().as_markdown(),
    ])


def _figure(est, data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._objective import stack_blocks
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    clients = np.arange(len(est.p_values_))
    score = -np.log10(np.maximum(est.p_values_, 1e-300))
    colors = np.where(data.contaminated, "tab:red", "tab:blue")
    left.bar(clients, score, color=colors)
    left.axhline(-est.offset_ / np.log(10), color="k", ls="--",
                 label="decision boundary (between flagged and kept p-values)")
    left.axhline(-np.log10(est.test_level), color="grey", ls=":", label="level (uncorrected)")
    left.set_yscale("symlog", linthresh=1.0)
    left.set(xlabel="client", ylabel="-log10 p-value (symlog)",
             title="Contamination scores (red: truly contaminated)")
    left.legend(fontsize=7, loc="center right")
    sing = np.linalg.svd(stack_blocks(est.low_rank_), compute_uv=False)
    right.semilogy(np.arange(1, len(sing) + 1), np.maximum(sing, 1e-16), "o-")
    right.set(xlabel="index", ylabel="singular value", title="Singular values of L_hat")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.resolve()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_output", help="directory for report and figure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solver", default="auto", choices=["auto", "torch", "cvxpy"])
    args = parser.parse_args(argv)
    numbers = run(args.output, seed=args.seed, solver=args.solver)
    print(numbers["report"].split("## Fit summary")[0])
    print(f"report written to {Path(args.output).resolve() / 'report.md'}")


if __name__ == "__main__":
    main()
