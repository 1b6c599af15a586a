"""Fit CLAIR on a generated federated regression and write a report and a figure.

Run it as ``python -m clairstat.demo`` (``make demo`` does). It generates K = 40 clients,
each with a p = 30 by q = 8 OLS estimate from n = 200 samples, a shared rank-3 subspace
and 8 contaminated clients; fits CLAIR; prints which clients it flags against the truth,
the subspace error, the refined estimates' error against local OLS and the solver's
certificate; and writes ``report.md`` and ``demo.png`` (each client's -log10 p-value,
coloured by flag, marked by truth; the singular values of the low-rank part).
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

    Parameters
    ----------
    output_dir : str or path
        Created if missing.
    seed : int, default=0
        Seeds the data and the fit.
    solver : {"auto", "torch", "cvxpy"}, default="auto"
    **overrides
        Replace entries of ``DEFAULTS`` (``n_clients``, ``p``, ``q``, ``rank``,
        ``n_samples``, ``n_contaminated``).

    Returns
    -------
    dict
        The numbers of the report, ``figure`` (the figure's file name, relative to
        ``output_dir`` as in the report) and ``report`` (its Markdown text).
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
    numbers["figure"] = _figure(est, data, output_dir / "demo.png")
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
        f"- figure: {n['figure']} (beside this report)",
        "",
        "## Fit summary",
        "",
        est.summary().as_markdown(),
        "",
        "## Figure",
        "",
        f"![Per-client -log10 p-values; singular values of L_hat]({n['figure']})",
        "",
    ])


def _figure(est, data, path):
    """Draw the demo figure (:func:`draw_figure`), save it to ``path``; its file name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw_figure(est, data)
    # bbox_inches="tight" grows the canvas to hold the legend beside the axes.
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path).name


def draw_figure(est, data):
    """The demo figure: each client's test, and the spectrum of the low-rank part.

    Left: every client's -log10 adjusted p-value (symlog axis; the p-values corrected
    over the clients, as the flags are decided), colour by CLAIR's flag, marker by the
    truth, with the level the adjusted p-values are cut at. Right: singular
    values of the stacked low-rank part ``L_hat``. The legend sits below the axes.

    Parameters
    ----------
    est : CLAIREstimator
        A fitted estimator.
    data : Bunch
        The data it was fitted on (``contaminated`` gives the truth).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from ._objective import stack_blocks

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2),
                                      gridspec_kw={"width_ratios": [1.6, 1]})
    clients = np.arange(len(est.p_values_))
    # p-values below 1e-300 underflow; clip them so -log10 stays finite.
    score = -np.log10(np.maximum(est.adjusted_p_values_, 1e-300))
    colours = {True: "tab:red", False: "tab:blue"}
    markers = {True: "X", False: "o"}
    for truth in (False, True):
        for flag in (False, True):
            keep = (data.contaminated == truth) & (est.contaminated_ == flag)
            left.scatter(clients[keep], score[keep], c=colours[flag], marker=markers[truth],
                         s=46, edgecolors="k", linewidths=0.4, zorder=3)
    left.axhline(-np.log10(est.test_level), color="k", ls="--", zorder=2)
    left.set_yscale("symlog", linthresh=1.0)
    left.set_ylim(bottom=0, top=max(score.max(), 1.0) * 2)  # headroom above the top point
    left.set_xlim(-1, len(clients))
    left.set(xlabel="client", ylabel="-log10 adjusted p-value (symlog, capped at 300)",
             title=f"Per-client contamination test: adjusted p-value ({est.correction})")
    handles = [
        Line2D([], [], ls="", marker="s", color=colours[True], label="flagged by CLAIR"),
        Line2D([], [], ls="", marker="s", color=colours[False], label="kept"),
        Line2D([], [], ls="", marker=markers[True], color="k", label="truly contaminated"),
        Line2D([], [], ls="", marker=markers[False], color="k", mfc="none",
               label="truly collaborative"),
        Line2D([], [], color="k", ls="--",
               label=f"level {est.test_level:g}: flagged above"),
    ]
    left.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3,
                fontsize=8, frameon=False)
    sing = np.linalg.svd(stack_blocks(est.low_rank_), compute_uv=False)
    index = np.arange(1, len(sing) + 1)
    right.semilogy(index, np.maximum(sing, 1e-16), "o-", ms=3)
    right.axvline(est.rank_ + 0.5, color="grey", ls=":")
    right.set(xlabel="index", ylabel="singular value (log scale)",
              title=f"Singular values of the low-rank part\n(shared rank {est.rank_})")
    fig.tight_layout()
    return fig


def main(argv=None):
    """Command line of ``python -m clairstat.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m clairstat.demo",
        description="Fit CLAIR on a generated federated regression (40 clients, 8 of "
                    "them contaminated), print what it finds, and write report.md and "
                    "demo.png.")
    parser.add_argument("--output", default="demo_output",
                        help="directory for report.md and demo.png (default: demo_output)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the data and of the fit (default: 0)")
    parser.add_argument("--solver", default="auto", choices=["auto", "torch", "cvxpy"],
                        help="solver backend; auto uses torch when it is installed "
                             "(default: auto)")
    args = parser.parse_args(argv)
    numbers = run(args.output, seed=args.seed, solver=args.solver)
    print(numbers["report"].split("## Fit summary")[0])
    print(f"report written to {Path(args.output) / 'report.md'}")


if __name__ == "__main__":
    main()
