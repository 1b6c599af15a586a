"""From peft LoRA adapters to per-module updates, CLAIR refinement, and back to adapters.

Client k's adapter holds, for every adapted module, ``lora_A`` (r_k, d_in) and ``lora_B``
(d_out, r_k); its update is ``Delta W_k = s_k B_k A_k`` with the peft scaling
``s_k = lora_alpha / r_k`` (``lora_alpha / sqrt(r_k)`` with rsLoRA). This module

1. reads the factors of every client (:func:`adapter_factors`, :func:`module_factors`),
   absorbing ``s_k`` into ``B``;
2. runs CLAIR per module, or over all modules jointly (:func:`refine_adapters`), or any
   other rule of :mod:`clairstat.aggregation` (:func:`aggregate_adapters`), always on the
   exact reduction of :func:`clairstat.aggregation.reduce_factors`: the stacked updates of
   a module have rank at most ``sum_k r_k``, so a 4096 x 4096 module costs what a
   ``sum r_k`` x ``sum r_k`` one does;
3. writes refined updates back as rank-``r_k`` LoRA factors (Eckart-Young readout by a
   small SVD) into state dicts with the client's own keys, dtypes and scaling, ready for
   ``peft.set_peft_model_state_dict``.

Only numpy is needed for the mathematics; torch tensors are accepted and returned when
the input holds them. Adapters are saved and loaded with safetensors only
(:func:`save_adapter`, :func:`load_adapter`): no pickle is ever read.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from ._factored import truncated_svd
from ._threads import svt_flops, thread_limits
from .aggregation import ReducedStack, aggregate, reduce_factors

__all__ = ["lora_scaling", "adapter_factors", "module_factors", "readout_factors",
           "factors_to_state_dict", "refine_adapters", "aggregate_adapters",
           "global_state_dict", "LoraRefinement", "save_adapter", "load_adapter"]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?"
                       r"\.weight$")


def _require(module, extra):
    """Import an optional dependency or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"this feature of clairstat.lora needs {module}: "
                          f"pip install clairstat[{extra}]") from error


def _config_get(config, name, default=None):
    """Read a field from a peft ``LoraConfig`` or from its dict (adapter_config.json)."""
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def lora_scaling(config, module_name, rank):
    """The peft scaling ``s`` of one module: ``alpha / r``, or ``alpha / sqrt(r)`` (rsLoRA).

    Parameters
    ----------
    config : peft.LoraConfig, dict or None
        ``None`` means the factors already carry the scale (``s = 1``).
    module_name : str
        Module path; ``alpha_pattern`` keys match its suffix as in peft.
    rank : int
        The module's LoRA rank (read from the factors, so ``rank_pattern`` is honoured).

    Examples
    --------
    >>> lora_scaling({"lora_alpha": 16}, "layers.0.q_proj", 8)
    2.0
    >>> lora_scaling({"lora_alpha": 16, "alpha_pattern": {"q_proj": 4}}, "x.q_proj", 4)
    1.0
    """
    if config is None:
        return 1.0
    alpha = _config_get(config, "lora_alpha", 8)
    for pattern, value in (_config_get(config, "alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            alpha = value
            break
    root = math.sqrt(rank) if _config_get(config, "use_rslora", False) else rank
    return float(alpha) / root


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor; float64 keeps the SVDs accurate
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _parse(state_dict):
    """``{module: {"A": key, "B": key}}`` for the LoRA weights of a state dict."""
    modules = {}
    for key in state_dict:
        match = _LORA_KEY.match(key)
        if match:
            modules.setdefault(match["module"], {})[match["which"]] = key
        elif "lora_embedding" in key or "lora_magnitude" in key:
            raise ValueError(f"{key}: embedding LoRA and DoRA adapters are not supported.")
    incomplete = [name for name, keys in modules.items() if set(keys) != {"A", "B"}]
    if incomplete or not modules:
        raise ValueError(f"no complete lora_A/lora_B pairs (incomplete: {incomplete}).")
    return modules


def adapter_factors(state_dict, config=None):
    """Per-module factors of one adapter, the scaling absorbed into ``B``.

    Parameters
    ----------
    state_dict : dict of str to Tensor or ndarray
        ``peft.get_peft_model_state_dict(model)`` (keys ``...q_proj.lora_A.weight``) or a
        model's full state dict (keys ``...q_proj.lora_A.default.weight``).
    config : peft.LoraConfig or dict, optional
        Gives the scaling; ``None`` takes the factors as they are.

    Returns
    -------
    dict of str to (ndarray of shape (d_out, r), ndarray of shape (r, d_in))
        ``(s B, A)`` per module, float64, so that ``Delta W = (s B) A``.

    Examples
    --------
    >>> sd = {"m.lora_A.weight": np.ones((2, 3)), "m.lora_B.weight": np.ones((4, 2))}
    >>> b, a = adapter_factors(sd, {"lora_alpha": 4})["m"]
    >>> float((b @ a)[0, 0])  # scale 4 / 2, times the inner sum over r = 2
    4.0
    """
    factors = {}
    for module, keys in _parse(state_dict).items():
        a_mat, b_mat = _to_numpy(state_dict[keys["A"]]), _to_numpy(state_dict[keys["B"]])
        if b_mat.ndim != 2 or a_mat.ndim != 2 or b_mat.shape[1] != a_mat.shape[0]:
            raise ValueError(f"{module}: lora_B {b_mat.shape} and lora_A {a_mat.shape}.")
        factors[module] = (lora_scaling(config, module, a_mat.shape[0]) * b_mat, a_mat)
    return factors


def _per_client(value, n_clients, name):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_clients
    if len(values) != n_clients:
        raise ValueError(f"{name}: expected one entry per client ({n_clients}).")
    return values


def module_factors(state_dicts, configs=None):
    """Factors of every client, grouped by module.

    Parameters
    ----------
    state_dicts : list of dict, length n_clients
    configs : LoraConfig, dict, or list of them, optional
        One config for all clients or one per client (ranks and alphas may differ).

    Returns
    -------
    dict of str to list of (ndarray of shape (d_out, r_k), ndarray of shape (r_k, d_in))
        For each module, client k's ``(s_k B_k, A_k)``; every client must adapt the same
        modules.
    """
    configs = _per_client(configs, len(state_dicts), "configs")
    per_client = [adapter_factors(sd, cfg) for sd, cfg in zip(state_dicts, configs)]
    names = list(per_client[0])
    for k, factors in enumerate(per_client):
        if set(factors) != set(names):
            raise ValueError(f"client {k} adapts modules {sorted(factors)}, client 0 "
                             f"adapts {sorted(names)}.")
    return {name: [factors[name] for factors in per_client] for name in names}


def readout_factors(left_basis, reduced, right_basis, rank):
    """Best rank-``rank`` factors of ``Q X V^T``, zero-padded to exactly ``rank``.

    Parameters
    ----------
    left_basis : ndarray of shape (d_out, s)
        Orthonormal columns Q.
    reduced : ndarray of shape (s, t)
        Reduced update X.
    right_basis : ndarray of shape (d_in, t)
        Orthonormal columns V.
    rank : int

    Returns
    -------
    b_mat : ndarray of shape (d_out, rank)
    a_mat : ndarray of shape (rank, d_in)
        ``b_mat @ a_mat`` is the Eckart-Young truncation of ``Q X V^T`` (exact when
        ``rank(X) <= rank``), with the singular values split evenly between the factors.
    """
    return _split(left_basis, truncated_svd(np.asarray(reduced), rank), right_basis, rank)


def _split(left_basis, triplets, right_basis, rank):
    """Factors ``(Q U S^1/2, S^1/2 V^T V_basis^T)`` of reduced singular triplets, padded."""
    left, singular, right_t = triplets
    root = np.sqrt(singular)
    return _pad(left_basis @ (left * root), (root[:, None] * right_t) @ right_basis.T, rank)


def _readout_client(stack, k, rank):
    """``readout_factors`` of client k of a ReducedStack (structured when factored)."""
    if hasattr(stack.reduced, "truncated_svd"):  # FactoredRefined: never formed densely
        return _split(stack.left_basis, stack.reduced.truncated_svd(k, rank),
                      stack.right_basis, rank)
    return readout_factors(stack.left_basis, stack.reduced[k], stack.right_basis, rank)


def _pad(b_mat, a_mat, rank):
    """Zero columns of B and rows of A up to ``rank`` (fewer singular values than asked)."""
    missing = rank - b_mat.shape[1]
    if missing > 0:
        b_mat = np.hstack([b_mat, np.zeros((b_mat.shape[0], missing))])
        a_mat = np.vstack([a_mat, np.zeros((missing, a_mat.shape[1]))])
    return b_mat, a_mat


def _like(array, template):
    """``array`` as the type (torch or numpy) and dtype of ``template``."""
    if hasattr(template, "detach"):
        torch = _require("torch", "lora")
        return torch.as_tensor(np.ascontiguousarray(array)).to(template.dtype)
    return np.asarray(array, dtype=np.asarray(template).dtype)


def factors_to_state_dict(factors, template, config=None):
    """Write per-module factors ``(s B, A)`` into a copy of ``template``.

    Parameters
    ----------
    factors : dict of str to (ndarray of shape (d_out, r), ndarray of shape (r, d_in))
        With the scaling absorbed into ``B``, as :func:`adapter_factors` returns them.
    template : dict
        A state dict of the receiving adapter: its keys, dtypes and tensor type are kept,
        its non-LoRA entries are copied unchanged.
    config : LoraConfig or dict, optional
        The receiving adapter's config; its scaling is divided out of ``B``.

    Returns
    -------
    dict
        A state dict that ``peft.set_peft_model_state_dict`` loads.
    """
    out = dict(template)
    for module, keys in _parse(template).items():
        b_mat, a_mat = factors[module]
        expected = tuple(template[keys["A"]].shape)
        if tuple(a_mat.shape) != expected:
            raise ValueError(f"{module}: factors of rank {a_mat.shape[0]} do not fit "
                             f"lora_A {expected}.")
        scale = lora_scaling(config, module, a_mat.shape[0])
        out[keys["A"]] = _like(a_mat, template[keys["A"]])
        out[keys["B"]] = _like(b_mat / scale, template[keys["B"]])
    return out


def _ranks(factor_lists):
    first = next(iter(factor_lists.values()))
    return [a.shape[0] for _, a in first]


@dataclasses.dataclass
class LoraRefinement:
    """Output of :func:`refine_adapters`.

    Attributes
    ----------
    state_dicts : list of dict, length n_clients
        Refined adapters, rank ``r_k`` each, in the clients' own key layout; a flagged
        client gets its own adapter back unchanged.
    flagged : ndarray of shape (n_clients,), bool
        Client-level flags: the joint test, or (per module) flagged in more than half of
        the fitted modules (a module with every update zero is not fitted).
    module_flagged : dict of str to ndarray of shape (n_clients,)
        Flags of each module's fit (all equal to ``flagged`` when ``joint``).
    per_client : dict of str to ReducedStack
        Refined dense updates ``Delta W~_k`` (scale included), (n_clients, d_out, d_in)
        when expanded; kept in reduced form. Per module, these follow that module's own
        flags; ``state_dicts`` follow the client-level ``flagged``.
    collaborative_mean : dict of str to ReducedStack
        The collaborative set's mean update per module (one element).
    estimators : dict
        The fitted :class:`clairstat.CLAIREstimator` per module, or ``{"joint": est}``;
        ``None`` where nothing was fitted (every update zero, see
        :func:`refine_adapters`).
    joint : bool
    """

    state_dicts: list
    flagged: np.ndarray
    module_flagged: dict
    per_client: dict
    collaborative_mean: dict
    estimators: dict
    joint: bool

    def mean_state_dict(self, template, config=None):
        """The collaborative mean update of every module as an adapter like ``template``.

        Parameters
        ----------
        template : dict
            State dict of the receiving adapter (its rank per module is kept).
        config : LoraConfig or dict, optional

        Returns
        -------
        dict
            A module whose mean update is exactly zero (fresh adapters) gets ``B = 0``
            and the template's own ``A``, not the readout's ``A = 0``, which would stop
            LoRA training (both factors' gradients vanish).
        """
        factors = {}
        for module, keys in _parse(template).items():
            mean, rank = self.collaborative_mean[module], template[keys["A"]].shape[0]
            if not np.any(mean.reduced[0]):
                factors[module] = (np.zeros((mean.left_basis.shape[0], rank)),
                                   _to_numpy(template[keys["A"]]))
                continue
            factors[module] = readout_factors(mean.left_basis, mean.reduced[0],
                                              mean.right_basis, rank)
        return factors_to_state_dict(factors, template, config)


def _all_zero(factors):
    """Whether every client's update ``B_k A_k`` of a module is 0 (B_k = 0 or A_k = 0)."""
    return all(not np.any(b_mat) or not np.any(a_mat) for b_mat, a_mat in factors)


def _zero_fit(factors):
    """The outcome for a module whose updates are all 0 (fresh adapters): nothing to fit,
    zero refined updates and mean, nobody flagged, no estimator."""
    red = reduce_factors(factors, backbone=True)
    zeros = np.zeros_like(red.updates)
    return (ReducedStack(red.left_basis, zeros, red.right_basis),
            ReducedStack(red.left_basis, zeros[:1], red.right_basis),
            np.zeros(len(factors), dtype=bool), None)


def _modules(factor_lists, progress):
    """``factor_lists.items()``, through ``progress(iterable, total=n_modules)`` if given."""
    items = factor_lists.items()
    return items if progress is None else progress(items, total=len(factor_lists))


def _fit_per_module(factor_lists, weights, clair_params, progress=None):
    out = {}
    for name, factors in _modules(factor_lists, progress):
        if _all_zero(factors):
            out[name] = _zero_fit(factors)
            continue
        result = aggregate("clair", factors, weights, **clair_params)
        red = result.reduction
        mean = ReducedStack(red.left_basis, np.asarray(result.estimator.collaborative_mean_)[None],
                            red.right_basis)
        out[name] = (result.per_client, mean, result.flagged, result.estimator)
    return out


def _fit_joint(factor_lists, weights, clair_params, progress=None):
    """One CLAIR fit on every client's concatenated reduced updates (vectors, q = 1)."""
    from . import CLAIREstimator

    if all(_all_zero(factors) for factors in factor_lists.values()):
        return {name: _zero_fit(factors) for name, factors in factor_lists.items()}
    reductions = {name: reduce_factors(f, backbone=True)
                  for name, f in _modules(factor_lists, progress)}
    n_clients = len(next(iter(factor_lists.values())))
    vectors = np.hstack([r.updates.reshape(n_clients, -1) for r in reductions.values()])
    # The K vectors span at most K dimensions: one more exact reduction (an isometry).
    basis = np.linalg.qr(vectors.T)[0]
    estimator = CLAIREstimator(**clair_params).fit((vectors @ basis)[:, :, None],
                                                   sample_weight=weights)
    flagged = np.asarray(estimator.contaminated_, dtype=bool)
    refined = estimator.refined_[:, :, 0] @ basis.T
    mean = basis @ estimator.collaborative_mean_[:, 0]
    out, start = {}, 0
    for name, red in reductions.items():
        size = red.updates[0].size
        shape = red.updates.shape[1:]
        block = refined[:, start:start + size].reshape(n_clients, *shape)
        mean_block = mean[start:start + size].reshape(1, *shape)
        out[name] = (ReducedStack(red.left_basis, block, red.right_basis),
                     ReducedStack(red.left_basis, mean_block, red.right_basis),
                     flagged, estimator)
        start += size
    return out


def _readout_state_dicts(state_dicts, configs, per_client, flagged, ranks, keep=()):
    """Each client's refined updates as rank-``ranks[k]`` factors in its own layout;
    the modules in ``keep`` (all updates zero) keep the client's own lora_A and lora_B."""
    refined = []
    for k, (template, config) in enumerate(zip(state_dicts, configs)):
        if flagged[k]:  # the estimator returns a flagged client's own estimate
            refined.append(dict(template))
            continue
        factors = {name: _readout_client(stack, k, ranks[k])
                   for name, stack in per_client.items() if name not in keep}
        if keep:  # placeholders, then the client's own arrays, exactly
            own = adapter_factors(template, config)
            factors.update({name: own[name] for name in keep})
        state = factors_to_state_dict(factors, template, config)
        keys = _parse(template)
        state.update({keys[name][w]: template[keys[name][w]] for name in keep for w in "AB"})
        refined.append(state)
    return refined


def _lora_work(factor_lists):
    """Flops of the largest module: its reduction's two QRs and its fit's SVT.

    A module with client factors ``B_k`` (d_out, r_k), ``A_k`` (r_k, d_in) reduces by QRs
    of (d_out, s) and (d_in, s) matrices, ``s = sum_k r_k``, and is fitted on
    (n_clients, s, max r_k) blocks (:func:`clairstat._threads.svt_flops`).
    """
    work = 0.0
    for factors in factor_lists.values():
        total = sum(a_mat.shape[0] for _, a_mat in factors)
        widest = max(a_mat.shape[0] for _, a_mat in factors)
        d_out, d_in = factors[0][0].shape[0], factors[0][1].shape[1]
        work = max(work, (d_out + d_in) * total ** 2
                   + svt_flops((len(factors), total, widest)))
    return work


def refine_adapters(state_dicts, configs=None, *, joint=False, sample_weight=None,
                    n_jobs=None, progress=None, **clair_params):
    """CLAIR on the clients' LoRA adapters: detect, refine, and write refined adapters.

    Parameters
    ----------
    state_dicts : list of dict, length n_clients
        The clients' adapters (``peft.get_peft_model_state_dict``); ranks may differ.
    configs : LoraConfig, dict, or list of them, optional
        One per client, or one for all (gives the scalings).
    joint : bool, default=False
        ``False``: one CLAIR fit per module (each module has its own collaborative set,
        subspace and rank). ``True``: one fit on each client's concatenated reduced
        updates, a vector of length ``sum_m s_m t_m`` (``q = 1``), itself reduced
        exactly to the n_clients-dimensional span of the vectors: one test per client
        using every module's evidence, one collaborative set, and a shared subspace of
        the joint update space (PCA-type shrinkage of whole adapters).
    sample_weight : array-like of shape (n_clients,), optional
        Client weights of the collaborative mean (e.g. sample sizes).
    n_jobs : int or None, default=None
        Threads of torch and of the BLAS/OpenMP pools for the whole refinement
        (:func:`clairstat._threads.thread_limits`): ``None`` chooses from the work of
        the largest module (one thread for small adapters), ``-1`` uses every usable
        CPU, a positive int that many.
    progress : callable, optional
        Called as ``progress(iterable, total=n_modules)`` around the loop over modules
        (the fits, or the reductions when ``joint``) and iterated; ``tqdm.tqdm`` fits.
    **clair_params
        Parameters of :class:`clairstat.CLAIREstimator` (``rank``, ``test_level``, ...).

    Returns
    -------
    LoraRefinement

    Notes
    -----
    Per module (the default) each module is reduced exactly (method, section 2) to the
    orthonormal basis Q of all ``B_k`` on the left and, on the right, to each client's
    own row basis: ``Delta W_k = Q Y_k W_k^T`` with ``Y_k`` of size at most
    ``sum r_k x r_k``, and the fit has no backbone (LoRA updates are differences from
    the base weights; pass ``backbone=True`` for the (sum r_k x sum r_k) blocks of the
    shared row basis instead). The detection and the refinement run on the factored
    stack (:mod:`clairstat._factored`), so a 4096 x 4096 module with 50 rank-16 clients
    takes seconds (``benchmarks/RESULTS.md``). The refined update
    ``P Delta W_k + (I - P) mean_C`` generally has rank above ``r_k``; the adapter keeps
    its best rank-``r_k`` approximation (``per_client`` keeps it all).

    A module whose updates are all exactly zero (every client's ``lora_B`` or
    ``lora_A`` is 0, as in adapters peft has just initialised) is not fitted: nobody is
    flagged in it, its refined updates and mean are 0, and every client keeps its own
    ``lora_A`` and ``lora_B`` there (a readout would set ``A = 0`` too, and LoRA cannot
    train from ``A = B = 0``); such modules do not vote in the client-level flags. With
    ``joint=True`` the fit is skipped only when every module is zero; a zero module in a
    joint fit has zero refined updates as well and keeps the clients' own factors.

    On the copying experiment (``simulations/copying/RESULTS.md``) per-module CLAIR
    detects without false alarms but gains less than the joint fit, which pools whole
    adapters across modules; ``joint=True`` is the stronger refinement there.
    """
    configs = _per_client(configs, len(state_dicts), "configs")
    factor_lists = module_factors(state_dicts, configs)
    fit = _fit_joint if joint else _fit_per_module
    with thread_limits(n_jobs, _lora_work(factor_lists)):
        fitted = fit(factor_lists, sample_weight, clair_params, progress)
        module_flagged = {name: item[2] for name, item in fitted.items()}
        # Modules with nothing fitted (all updates zero) do not vote.
        votes = [module_flagged[name] for name, item in fitted.items() if item[3] is not None]
        flagged = np.mean(votes, axis=0) > 0.5 if votes else np.zeros(len(state_dicts), bool)
        per_client = {name: item[0] for name, item in fitted.items()}
        zero_modules = {name for name, factors in factor_lists.items() if _all_zero(factors)}
        refined = _readout_state_dicts(state_dicts, configs, per_client, flagged,
                                       _ranks(factor_lists), keep=zero_modules)
    estimators = ({"joint": next(iter(fitted.values()))[3]} if joint
                  else {name: item[3] for name, item in fitted.items()})
    return LoraRefinement(refined, flagged, module_flagged, per_client,
                          {name: item[1] for name, item in fitted.items()}, estimators, joint)


def aggregate_adapters(rule, state_dicts, configs=None, weights=None, **options):
    """Any rule of :func:`clairstat.aggregation.aggregate`, module by module.

    Parameters
    ----------
    rule : str
        A rule name of :data:`clairstat.aggregation.RULE_NAMES`.
    state_dicts : list of dict
    configs : LoraConfig, dict or list of them, optional
    weights : array-like of shape (n_clients,), optional
    **options
        Rule options. ``reference`` (fedrot) may be a state dict: its factors for each
        module are used.

    Returns
    -------
    dict of str to AggregationResult
    """
    configs = _per_client(configs, len(state_dicts), "configs")
    factor_lists = module_factors(state_dicts, configs)
    reference = options.pop("reference", None)
    if isinstance(reference, dict):
        reference = adapter_factors(reference, configs[0])
    results = {}
    for name, factors in factor_lists.items():
        extra = {"reference": reference[name]} if reference is not None else {}
        results[name] = aggregate(rule, factors, weights, **options, **extra)
    return results


def global_state_dict(results, template, config=None, rank=None):
    """The global update of every module as an adapter of the template's rank.

    Parameters
    ----------
    results : dict of str to AggregationResult
        From :func:`aggregate_adapters`.
    template : dict
        State dict of the receiving adapter (keys, dtypes, rank).
    config : LoraConfig or dict, optional
    rank : int, optional
        Defaults to the template's rank of each module.

    Returns
    -------
    dict
        The best rank-``r`` factors of each module's ``update`` (a thin SVD of the dense
        (d_out, d_in) update; rules with their own factors of the right rank use them).
        A zero update (fresh adapters) at the template's rank gives ``B = 0`` and the
        template's own ``A``, which keeps the adapter trainable (a readout's ``A = 0``
        would not).
    """
    factors = {}
    for module, keys in _parse(template).items():
        result = results[module]
        own_rank = template[keys["A"]].shape[0]
        module_rank = rank or own_rank
        if result.factors is not None and result.factors[0].shape[1] == module_rank:
            factors[module] = result.factors
        elif module_rank == own_rank and not np.any(result.update):
            factors[module] = (np.zeros((result.update.shape[0], own_rank)),
                               _to_numpy(template[keys["A"]]))
        else:
            factors[module] = _dense_readout(result.update, module_rank)
    return factors_to_state_dict(factors, template, config)


def _dense_readout(update, rank):
    """Best rank-``rank`` factors of a dense (d_out, d_in) update, zero-padded."""
    left, singular, right_t = truncated_svd(np.asarray(update, dtype=np.float64), rank)
    root = np.sqrt(singular)
    return _pad(left * root, root[:, None] * right_t, rank)


def save_adapter(state_dict, path):
    """Save an adapter state dict of torch tensors with safetensors (no pickle)."""
    safetensors_torch = _require("safetensors.torch", "lora")
    safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))


def load_adapter(path):
    """Load an adapter saved by :func:`save_adapter` (safetensors: never unpickles)."""
    safetensors_torch = _require("safetensors.torch", "lora")
    return safetensors_torch.load_file(str(path))
