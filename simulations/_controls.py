"""Negative controls: deliberately broken variants of the method, run by the same studies.

A control is a name passed to a study's ``simulate_one(params, seed, control=NAME)``; the
study applies the breakage where its method would act (see each entry's description) and
measures everything else as usual. Seeds do not depend on the control, so a control's
replicate sees the same data as the normal replicate. Control tables go to
``<results_dir>/controls/<NAME>/<scale>/<study>.jsonl``, never into the normal tables;
a file ``CONTROL`` in ``<results_dir>/controls/<NAME>/`` names the control, and a run
refuses a results directory whose marker names another control than its own (a normal
run's, none).

``python -m validation --control NAME`` runs every study that declares the control,
reads the normal tables of the others (the control does not change them), and reports
whether every check the control targets fails: a check that no control can make fail is
an identity check, not evidence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path

__all__ = ["Control", "CONTROLS", "CONTROL_MARKER", "get_control", "control_results_dir",
           "marked_control", "tables_dir", "broken_lora_tests"]

#: Name of the file in a control's results directory that names the control.
CONTROL_MARKER = "CONTROL"


@dataclasses.dataclass(frozen=True)
class Control:
    """A broken method: what is broken, and which checks must then fail.

    Parameters
    ----------
    name : str
    description : str
        What the studies do instead of the method.
    targets : tuple of str
        Names of the theory checks the breakage must make fail.
    """

    name: str
    description: str
    targets: tuple


CONTROLS = {control.name: control for control in [
    Control("random-subspace",
            "the fitted shared subspace P_hat is replaced by a Haar-random subspace of the "
            "same dimension (stability: the error is measured on it; refinement: the "
            "refinement uses it; recovery: the success criterion measures it)",
            ("stability_first_order_constant", "stability_first_order_slope",
             "refinement_gain_sign", "refinement_clair_vs_formula", "recovery_small_corner")),
    Control("weak-block-weight",
            "the exact program is solved with a quarter of the block weight lam it reports "
            "(recovery)",
            ("recovery_small_corner", "recovery_block_incoherence")),
    Control("no-detection",
            "nobody is flagged: the collaborative set is every client (detection, "
            "consistency; robustness: no flags, and CLAIR's global update is then the mean "
            "of every client's update; copying: the default's joint refinement pools every "
            "client)",
            ("detection_consistency_limit", "robust_clair_detection",
             "robust_clair_colluders", "robust_clair_beats_mean",
             "robust_clair_beats_mean_rank_unknown", "robust_clair_beats_mean_stealthy",
             "copying_attack_recall")),
    Control("local-refinement",
            "the refined estimate of every client is its own local estimate (refinement; "
            "copying: CLAIR's refined adapters are the local ones)",
            ("refinement_clair_vs_formula", "copying_gain_homogeneous",
             "copying_gain_heterogeneous")),
    Control("no-alignment",
            "FedRot rotates nothing: every client rotation is the identity (fedrot)",
            # not the three *_tightens_bound checks: their ratio is then exactly 1 in
            # every replicate, and a constant sample's interval
            # (validation._core.mean_interval) cannot exclude a mean just below 1
            # (spread-alignment is their control)
            ("fedrot_alignment_helps",)),
    Control("spread-alignment",
            "FedRot's rotations (of A, of B, of the concatenated factors) with every other "
            "client's sign reversed, R_i -> -R_i for odd i: every client's product B_i A_i "
            "is kept, the factors' weighted means nearly cancel, and the clients end "
            "further apart than their random gauges left them (fedrot)",
            ("fedrot_alignment_tightens_bound", "fedrot_b_alignment_tightens_bound",
             "fedrot_concatenated_tightens_bound", "fedrot_bound_not_looser_non_rotational",
             "fedrot_alignment_helps")),
    Control("inflated-noise",
            "the per-client test is given twice the true noise scale (detection, "
            "consistency)",
            # not detection_power_curve: it fails without the control (documented)
            ("detection_null_calibration", "detection_consistency_limit")),
    Control("no-correction",
            "the multiple-testing correction is forgotten: a client is flagged when its "
            "own p-value is below the level (detection; copying: in each module's test, "
            "unadjusted in every round of the detection, and a client is flagged when "
            "any module flags it, instead of the vote-count test across modules)",
            ("detection_bh_false_discoveries", "detection_holm_fwer",
             "copying_false_alarms")),
    Control("narrow-null",
            "the LoRA per-module tests' predictive null has half its spread "
            "(robustness; copying: CLAIR's variants): every statistic looks twice as far "
            "from the others' as it is. "
            "(The regression path has no such control: a noise scale given too small is "
            "raised by the tests' calibration, which brings the members' median p-value "
            "to 1/2.)",
            # not copying_false_alarms: at small scale it is inconclusive, 0.071 [0.045,
            # 0.11] (17 of 240 clean clients flagged; validation/README.md); its control
            # is no-correction
            ("robust_clair_level_without_attackers", "robust_clair_false_discoveries")),
    Control("robust-mean",
            "the plain mean's aggregate is replaced by Krum's (the one client update "
            "closest to its n - f - 2 nearest neighbours, f = (n - 3) // 2), a rule that "
            "does not break down with up to f attackers: what the robustness study reports as "
            "the mean's error is Krum's, which stays at the benign spread whatever gamma "
            "(robustness; the checks comparing CLAIR with the mean then compare it with "
            "Krum)",
            ("robust_mean_breakdown",)),
    Control("fixed-level",
            "the per-client test keeps the fixed level 0.05 at every size and the "
            "multiple-testing correction is forgotten: a client is flagged when its own "
            "p-value is below 0.05 instead of Holm's family-wise test at the shrinking "
            "level 1/K (consistency), so the expected number of false flags grows in "
            "proportion to K",
            # it cannot fail detection_consistency_trend at smoke scale: on two sizes of two
            # replicates the rate difference's Newcombe interval is about [-0.66, 0.66]
            # (tests/test_validation.py, SMOKE_UNDECIDED); at small scale it fails
            ("detection_consistency_trend", "detection_consistency_limit")),
    Control("fedavg-refinement",
            "CLAIR's refined updates, and the adapters its clients load, are FedAvg's "
            "aggregate (the exact mean of every client's update, attackers included), "
            "the same for every client; its flags are kept (copying)",
            # its failure is fixed by construction, as local-refinement's on the gain
            # checks: the margin over FedAvg is exactly 0 in every replicate, below the
            # smallest gain that counts (validation/checks/copying.py, MIN_GAIN), which
            # shows the pairwise comparison is wired, not that a subtler loss is seen.
            # local-refinement cannot serve: local LoRA beats every rule heterogeneous
            ("copying_beats_rules_homogeneous", "copying_beats_rules_heterogeneous")),
    Control("halfway-fedavg",
            "CLAIR's refined updates, and the adapters its clients load, are halfway "
            "between each client's own update and FedAvg's aggregate (their average); "
            "its flags are kept (copying)",
            # unlike fedavg-refinement's and local-refinement's, its verdicts are not fixed
            # by construction: the refined update is neither a rule's aggregate nor local
            # LoRA's. Not copying_beats_rules_heterogeneous: there every rule is 14.7
            # (Krum) to 21.9 points below local LoRA and the control passes it (7.68
            # [6.49, 8.86] at small scale; validation/README.md): the gain check is what
            # catches it there
            ("copying_beats_rules_homogeneous", "copying_gain_homogeneous",
             "copying_gain_heterogeneous")),
    Control("oracle-pools-all",
            "the oracle refinement is not given the collaborative set C: its off-subspace "
            "part is the mean over every client, the contaminated ones included, while "
            "the formula it is checked against keeps |C| and the heterogeneity over C "
            "(refinement; CLAIR is untouched: this breaks the theory's reference "
            "estimator, which no other control reaches)",
            ("refinement_oracle_formula",)),
]}


def get_control(name):
    """The :class:`Control` called ``name`` (``None`` passes through)."""
    if name is None:
        return None
    if name not in CONTROLS:
        raise KeyError(f"unknown control {name!r}; available: {sorted(CONTROLS)}.")
    return CONTROLS[name]


def control_results_dir(name, results_dir=None):
    """Root of a control's tables: ``<results_dir>/controls/<name>``."""
    from ._framework import default_results_dir

    base = Path(results_dir) if results_dir is not None else default_results_dir()
    return base / "controls" / name


def marked_control(directory):
    """The control named by the ``CONTROL`` file of ``directory``, or ``None`` if it has
    none (the directory of a normal run's tables, or one not yet used)."""
    path = Path(directory) / CONTROL_MARKER
    if not path.is_file():
        return None
    return path.read_text().strip() or "<empty CONTROL file>"


def tables_dir(control, results_dir=None, *, mark=False):
    """The directory of a run's tables, refusing one that holds another run's tables.

    Control rows have the schema of normal rows; only where they are says which is
    which. A normal run (``control=None``) uses the results root, which must not be a
    control's directory (its ``CONTROL`` file names one); a control run uses
    ``<root>/controls/<control>/``, whose ``CONTROL`` file, if there is one, must name
    ``control``, and reads the normal tables of the root too.

    Parameters
    ----------
    control : str or None
    results_dir : path-like, optional
        The results root (default :func:`simulations.default_results_dir`).
    mark : bool, default=False
        Write the ``CONTROL`` file of a control's directory that has none (a run that
        writes rows there); reading never writes.

    Returns
    -------
    pathlib.Path
        The root (``control=None``) or the control's directory.

    Raises
    ------
    simulations.RunError
        When a marker disagrees with ``control``.
    """
    from ._framework import RunError, default_results_dir

    root = Path(results_dir) if results_dir is not None else default_results_dir()
    marked = marked_control(root)
    if marked is not None:
        raise RunError(f"{root} holds the tables of the negative control {marked!r} (its "
                       f"{CONTROL_MARKER} file), not a results root: give the root above "
                       f"its controls/ folder as --results-dir"
                       + (f", with --control {marked}" if control is None else "") + ".")
    if control is None:
        return root
    directory = control_results_dir(control, root)
    marked = marked_control(directory)
    if marked is not None and marked != control:
        raise RunError(f"{directory} holds the tables of the negative control {marked!r} "
                       f"(its {CONTROL_MARKER} file), not of {control!r}.")
    if mark and marked is None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONTROL_MARKER).write_text(control + "\n")
    return directory


#: (module name, attribute) -> [number of replicates using the patch, the original].
_PATCHES = {}
_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _patched(module, name, replace):
    """``module.name`` replaced by ``replace(original)`` while the context lasts.

    The patch is installed once however many replicates run it at the same time (the
    threads of one Dask worker) and removed when the last of them ends; it is the
    process's, so a worker must not run other studies' replicates beside a control's
    (``python -m validation --control`` runs only the control's).
    """
    key = (module.__name__, name)
    with _PATCH_LOCK:
        entry = _PATCHES.setdefault(key, [0, None])
        if entry[0] == 0:
            entry[1] = getattr(module, name)
            setattr(module, name, replace(entry[1]))
        entry[0] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                setattr(module, name, entry[1])


def _narrowed(original):
    def narrow(*args, **kwargs):
        """:func:`clairstat._null.predictive_null` with half the spread."""
        return tuple(dataclasses.replace(null, spread=0.5 * null.spread)
                     for null in original(*args, **kwargs))
    return narrow


def _any_module(original):
    def any_module(module_flags, level):
        """A client flagged by any module's test (no vote-count test across modules)."""
        import numpy as np

        flags = np.asarray(module_flags, dtype=bool)
        return flags.any(axis=0) if flags.ndim == 2 and flags.size else original(
            module_flags, level)
    return any_module


def _unadjusted(original):
    def unadjusted(p_values, level, correction):
        """The p-values as they are (no multiple-testing adjustment)."""
        import numpy as np

        return np.asarray(p_values, dtype=float)
    return unadjusted


@contextlib.contextmanager
def broken_lora_tests(control):
    """The LoRA path's tests as a control breaks them; any other ``control`` (``None``
    included) changes nothing.

    - ``narrow-null`` (robustness, copying): the per-module null
      (:func:`clairstat._null.predictive_null`, as the tests call it) with half its
      spread, so that every statistic looks twice as far from the others' as it is.
    - ``no-correction`` (copying): a module's test flags a client whose own p-value is
      below the level (``clairstat._inference.adjust_p_values`` returns the p-values
      unadjusted, in every round of the detection: the multiplicity across clients
      forgotten), and a client is flagged when any module flags it
      (``clairstat.aggregation._modules.client_flags``, the binding
      ``joint_refinement`` and ``clair_modules`` call, becomes "any": the multiplicity
      across modules forgotten). Other bindings of ``client_flags``
      (``clairstat.aggregation.client_flags``, ``clairstat.lora``'s, the command
      line's) are not patched: a study that calls them directly is not broken by it.

    A patch of the process while the context lasts (:func:`_patched`).
    """
    if control == "narrow-null":
        from clairstat import _inference

        with _patched(_inference, "predictive_null", _narrowed):
            yield
    elif control == "no-correction":
        from clairstat import _inference
        from clairstat.aggregation import _modules

        with _patched(_inference, "adjust_p_values", _unadjusted), \
                _patched(_modules, "client_flags", _any_module):
            yield
    else:
        yield
