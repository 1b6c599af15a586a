"""From peft LoRA adapters to per-module updates, CLAIR refinement, and back to adapters.

Client k's adapter holds, for every adapted module, ``lora_A`` (r_k, d_in) and ``lora_B``
(d_out, r_k); its update is ``Delta W_k = s_k B_k A_k`` with the peft scaling
``s_k = lora_alpha / r_k`` (``lora_alpha / sqrt(r_k)`` with rsLoRA). This module

1. reads the factors of every client (:func:`adapter_factors`, :func:`module_factors`),
   absorbing ``s_k`` into ``B``;
2. hands them to :mod:`clairstat.aggregation`: CLAIR per module, or over all modules
   jointly (:func:`refine_adapters`, fitted by
   :func:`clairstat.aggregation.clair_modules`), or any other rule
   (:func:`aggregate_adapters`), always on the exact reductions of
   :mod:`clairstat._reduced`: the stacked updates of a module have rank at most
   ``sum_k r_k``, so a 4096 x 4096 module costs what a ``sum r_k`` x ``sum r_k`` one
   does;
3. writes refined updates back as rank-``r_k`` LoRA factors (Eckart-Young readout by a
   small SVD) into state dicts with the client's own keys, dtypes and scaling, ready for
   ``peft.set_peft_model_state_dict``.

Only numpy is needed for the mathematics; torch tensors are accepted and returned when
the input holds them. Adapters are saved and loaded with safetensors only
(:func:`save_adapter`, :func:`load_adapter`): no pickle is ever read.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ._reduced import eckart_young_factors, truncated_svd
from ._threads import thread_limits
from ._validation import user_stacklevel
from .aggregation import (ModuleRefinement, aggregate_modules, clair_modules, client_flags,
                          modules_work)
from .aggregation._validation import MAX_UPDATE_NORM, _safe_norm

__all__ = ["lora_scaling", "check_rank", "lora_pairs", "adapter_factors", "module_factors",
           "readout_factors", "factors_to_state_dict", "refine_adapters",
           "aggregate_adapters", "global_state_dict", "personalized_state_dicts",
           "LoraRefinement", "save_adapter", "load_adapter", "untested_keys"]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?"
                       r"\.weight$")
_LORA_BIAS = re.compile(r"^.+\.lora_[AB](?:\.[^.]+)?\.bias$")


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


_PEFT_PREFIX = "base_model.model."  # peft's prefix of module names in saved adapters


def lora_scaling(config, module_name, rank):
    r"""The peft scaling ``s`` of one module: ``alpha / r``, or ``alpha / sqrt(r)`` (rsLoRA).

    Parameters
    ----------
    config : peft.LoraConfig, dict or None
        ``None`` means the factors already carry the scale (``s = 1``).
    module_name : str
        Module path, as in the state dict (``base_model.model.<name in the base
        model>``) or without that prefix; ``alpha_pattern`` keys are matched as peft
        matches them, against the name in the base model (``(.*\.)?(key)$``), so keys
        anchored with ``^`` work too.
    rank : int
        The module's LoRA rank (read from the factors, so ``rank_pattern`` is honoured).

    Raises
    ------
    ValueError
        A config with ``target_parameters`` (LoRA on parameters such as stacked MoE
        experts, whose factors peft pairs per expert), or one of peft's LoRA variants
        whose update is not ``s B A`` (``UNSUPPORTED_VARIANTS``: KaSA's
        ``kasa_config``, BD-LoRA's ``use_bdlora``, QALoRA's ``use_qalora``, DoRA's
        ``use_dora``, a trained bias's ``lora_bias``).

    Examples
    --------
    >>> lora_scaling({"lora_alpha": 16}, "layers.0.q_proj", 8)
    2.0
    >>> lora_scaling({"lora_alpha": 16, "alpha_pattern": {"q_proj": 4}}, "x.q_proj", 4)
    1.0
    >>> lora_scaling({"lora_alpha": 16, "alpha_pattern": {"^model.layers.0.q_proj": 4}},
    ...              "base_model.model.model.layers.0.q_proj", 4)
    1.0
    """
    if config is None:
        return 1.0
    _check_variant(config)
    patterns = _check_patterns(config)
    # peft matches the patterns against the module's name in the base model; its saved
    # state dicts prefix that name with "base_model.model." (a "^"-anchored key never
    # matched the prefixed name, and the plain lora_alpha was used: a review, 2026-12-03)
    name = _base_name(module_name)
    alpha = _pattern_value(patterns, name, _config_get(config, "lora_alpha", 8))
    if rank < 1:
        raise ValueError(f"{module_name}: LoRA rank {rank} (lora_A has no rows).")
    root = math.sqrt(rank) if _config_get(config, "use_rslora", False) else rank
    check_alpha(alpha, f"lora_alpha of {module_name}")
    return float(alpha) / root


#: Config fields of peft's LoRA variants whose update is not ``s B A`` of the saved
#: factors, refused (a review: their adapters were refined as plain LoRA, silently
#: wrong): the variant's name, and why.
UNSUPPORTED_VARIANTS = {
    "kasa_config": ("KaSA", "its update is s B diag(lora_diag) A"),
    "use_bdlora": ("BD-LoRA", "its block-diagonal factor is saved as its blocks"),
    "use_qalora": ("QALoRA", "its lora_A acts on the input pooled in groups"),
    # (a review: a Flower strategy built with either config took it, then dropped
    # every client's reply as unreadable, round after round)
    "use_dora": ("DoRA", "its update is rescaled column by column by "
                         "lora_magnitude_vector"),
    "lora_bias": ("LoRA with a trained bias", "the bias is part of its update"),
}


def _check_variant(config):
    """ValueError for a config of a LoRA form whose update is not ``s B A`` of the
    saved factors: ``target_parameters`` or one of :data:`UNSUPPORTED_VARIANTS`."""
    if _config_get(config, "target_parameters"):
        # peft pairs such factors per expert (A as (experts, r, in), B as (out, r,
        # experts)), so B A is no expert's update, and its scaling differs
        raise ValueError("adapters with target_parameters (LoRA on parameters such as "
                         "stacked MoE experts) are not supported: peft pairs their factors "
                         "per expert, so B @ A is not the update.")
    for field, (variant, why) in UNSUPPORTED_VARIANTS.items():
        if _config_get(config, field):
            raise ValueError(f"{variant} adapters ({field} is set) are not supported: "
                             f"{why}, so B @ A is not the update.")


def check_alpha(alpha, what="lora_alpha"):
    """ValueError unless ``alpha`` is a finite non-zero number (``what`` names it).

    A zero alpha makes the scaling 0 (peft's update is then zero whatever ``lora_B``
    holds), and dividing it out of a refined ``lora_B`` writes infinities. A negative
    alpha is peft's too (its scaling is negative) and is kept.
    """
    try:
        finite = math.isfinite(alpha) and math.isfinite(float(alpha))
    except (OverflowError, TypeError):  # an int beyond float64 (10**400), or no number
        finite = False
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) \
            or not finite or alpha == 0:
        shown = repr(alpha) if len(repr(alpha)) <= 40 else repr(alpha)[:37] + "..."
        raise ValueError(f"{what} must be a finite non-zero number, got {shown}.")


def check_config(config):
    """ValueError unless a LoRA config is of plain LoRA (not ``target_parameters`` nor
    a variant of :data:`UNSUPPORTED_VARIANTS`, such as DoRA) and its scaling fields are
    usable: every
    ``alpha_pattern`` value finite and non-zero (:func:`check_alpha`) and every key a
    regular expression (peft matches them as such), and ``lora_alpha`` (peft's default
    8) finite and non-zero when there is no pattern (with patterns, the modules they
    leave use it, and :func:`lora_scaling` checks it there, naming the module).
    ``None`` (factors that carry their scale) passes."""
    if config is None:
        return
    _check_variant(config)
    patterns = _check_patterns(config)
    if not patterns:  # else the modules the patterns leave use it: lora_scaling checks it
        check_alpha(_config_get(config, "lora_alpha", 8), "lora_alpha")
    for pattern, value in patterns.items():
        check_alpha(value, f"alpha_pattern {pattern!r}")


def _base_name(module_name):
    """The module's name in the base model: without peft's ``base_model.model.``."""
    return module_name[len(_PEFT_PREFIX):] if module_name.startswith(_PEFT_PREFIX) \
        else module_name


def _pattern_value(patterns, name, default):
    """The value of the first key of ``patterns`` that matches the module ``name`` (its
    name in the base model) as peft matches them (``(.*\\.)?(key)$``), else
    ``default``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):  # keys checked by _check_patterns
            return value
    return default


def check_rank(config, module_name, rank):
    """ValueError where an adapter's own config states a rank for the module
    (``rank_pattern``, else ``r``) other than its factors' ``rank``.

    peft would not load such an adapter (its ``lora_A`` has the stated number of rows),
    and its scaling ``alpha / r`` would not be the one :func:`lora_scaling` reads from the
    factors. A dict without ``r`` or ``rank_pattern`` (or ``None``) states no rank. Only
    for a config that belongs to the adapter: one config shared by a federation's
    clients may sit beside factors of other ranks (each client's scaling then uses its
    own rank, as :func:`lora_scaling` does), and is not checked.
    """
    if config is None:
        return
    name = _base_name(module_name)
    ranks = _config_get(config, "rank_pattern") or {}
    if not isinstance(ranks, Mapping):
        raise ValueError(f"rank_pattern must be a mapping, got {ranks!r}.")
    unmatched = object()
    try:
        stated = _pattern_value(ranks, name, unmatched)
    except (re.error, TypeError) as error:
        raise ValueError(f"a rank_pattern key is not a regular expression ({error})."
                         ) from None
    where = "rank_pattern" if stated is not unmatched else "r"
    if stated is unmatched:
        stated = _config_get(config, "r")
        if stated is None:  # no rank stated (a matched rank_pattern None is one)
            return
    if isinstance(stated, bool) or not isinstance(stated, numbers.Integral) \
            or stated != rank:
        raise ValueError(f"{module_name}: its lora_A has {rank} rows but the config's "
                         f"{where} says {stated!r}: peft would not load this adapter; "
                         "give each client the config it was trained with.")


#: peft initialisations that move the base weights (``W - s B_0 A_0`` is saved as the base
#: the adapter sits on): the factors' product is then not the client's update alone but
#: holds the initial product, the base weights' principal (or quantisation-residual)
#: components, until peft converts the adapter.
_BASE_MOVING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def init_warning(configs, names=None):
    """A warning's text for clients whose config says their factors were initialised
    from the base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ: ``init_lora_weights``),
    or ``None``; ``names`` ``None``: one config shared by every client. Their ``B A``
    holds ``B_0 A_0``, the base weights' leading components, as well as the update:
    CLAIR would test and refine that sum (refining such adapters directly gave deltas
    about 3% from refining the converted ones, a review)."""
    found = []
    for k, config in enumerate(configs):
        init = _config_get(config, "init_lora_weights") if config is not None else None
        if isinstance(init, str) and init.lower().startswith(_BASE_MOVING_INITS):
            found.append(init if names is None else f"{names[k]} ({init})")
    if not found:
        return None
    who = (f"every client's config ({found[0]})" if names is None else
           f"client(s) {', '.join(found[:5])}{', ...' if len(found) > 5 else ''}")
    return (f"{who}: initialised from the base weights (init_lora_weights), so B A "
            "holds the initial product B_0 A_0 besides the update, and is tested and "
            "refined as it is. Refine adapters converted to plain LoRA instead (peft's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) for "
            "PiSSA, OLoRA, CorDA and LoRA-GA; LoftQ's quantised base has no such "
            "conversion).")


#: True inside :func:`mixed_ranks_expected`: one config is shared by clients whose
#: ranks may differ by design (the Flower strategy's ``lora_config``), and the warning of
#: :func:`module_factors` about ranks other than the config's is not given.
_MIXED_RANKS_EXPECTED = contextvars.ContextVar("mixed_ranks_expected", default=False)


@contextlib.contextmanager
def mixed_ranks_expected():
    """Within the block, a shared config beside clients of other ranks is expected."""
    token = _MIXED_RANKS_EXPECTED.set(True)
    try:
        yield
    finally:
        _MIXED_RANKS_EXPECTED.reset(token)


def _stated_rank(config, module_name):
    """The rank ``config`` states for a module (``rank_pattern``, else ``r``), or
    ``None`` where it states none or states it in a form :func:`check_rank` refuses."""
    if config is None:
        return None
    ranks = _config_get(config, "rank_pattern") or {}
    try:
        stated = _pattern_value(ranks, _base_name(module_name), None) \
            if isinstance(ranks, Mapping) else None
    except (re.error, TypeError):
        return None
    stated = _config_get(config, "r") if stated is None else stated
    return stated if isinstance(stated, numbers.Integral) \
        and not isinstance(stated, bool) else None


def _check_patterns(config):
    """``alpha_pattern`` of ``config`` (``{}`` if none), a ValueError unless it is a
    mapping whose keys are regular expressions; :func:`lora_scaling` checks only these
    (the alpha a module uses is checked where it is used)."""
    patterns = (_config_get(config, "alpha_pattern") if config is not None else None) or {}
    if not isinstance(patterns, Mapping):
        raise ValueError(f"alpha_pattern must be a mapping, got {patterns!r}.")
    for pattern in patterns:
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except (re.error, TypeError) as error:
            raise ValueError(f"alpha_pattern key {pattern!r} is not a regular expression "
                             f"({error}).") from None
    return patterns


def check_update_size(module, b_mat, a_mat, scale=1.0):
    """ValueError where ``scale * b_mat`` (d_out, r), ``a_mat`` (r, d_in) or their
    product have a norm above ``MAX_UPDATE_NORM`` (1e150, the bound every aggregation
    rule's factor check applies too; the product's norm is bounded by the factors';
    all computed without overflow). Factors holding non-finite values pass: the
    callers' own checks name them."""
    b_norm, a_norm = _safe_norm(b_mat), _safe_norm(a_mat)
    if not (math.isfinite(b_norm) and math.isfinite(a_norm)):
        return
    b_norm *= abs(scale)  # a float product: inf, not an exception, when it overflows
    bound = b_norm * a_norm
    if max(b_norm, a_norm, bound) > MAX_UPDATE_NORM:
        raise ValueError(
            f"{module}: its update is too large for float64 arithmetic: scaling x lora_B "
            f"has norm {b_norm:.3g}, lora_A {a_norm:.3g} (each, and their product, must "
            f"stay below {MAX_UPDATE_NORM:.0e}; the fits square them).")


# The factor dtypes read (and written back): a refined factor rounded to an integer or
# fp8 dtype would be beyond use (the command line reads the same four from safetensors).
_FACTOR_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _to_numpy(value, key=None):
    """A factor as a float64 ndarray; ``key`` given, a tensor or array of another dtype
    than :data:`_FACTOR_DTYPES` is refused (its refined factor would be written in it)."""
    dtype = getattr(value, "dtype", None)
    # numpy's name ignores the byte order (">f8" is float64); torch's is "torch.float64"
    name = dtype.name if isinstance(dtype, np.dtype) else str(dtype).replace("torch.", "")
    if key is not None and dtype is not None and name not in _FACTOR_DTYPES:
        raise ValueError(f"{key} is {name}: LoRA factors are "
                         f"read and written in {', '.join(_FACTOR_DTYPES)} (a refined "
                         "factor rounded to it would be beyond use); cast it first.")
    if hasattr(value, "detach"):  # a torch tensor; float64 keeps the SVDs accurate
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def lora_pairs(keys: Any) -> dict:
    """The LoRA factor keys of an adapter, grouped by module, without reading tensors.

    Parameters
    ----------
    keys : iterable of str
        The tensor names of a state dict or of a safetensors file (a dict iterates
        over its keys).

    Returns
    -------
    dict of str to dict
        ``{module: {"A": lora_A key, "B": lora_B key}}``.

    Raises
    ------
    ValueError
        No complete ``lora_A``/``lora_B`` pair, an incomplete pair, or embedding LoRA,
        DoRA, KaSA (``lora_diag``) or LoRA bias (``lora_B.bias``) keys (not supported).

    Examples
    --------
    >>> lora_pairs(["m.lora_A.weight", "m.lora_B.weight"])
    {'m': {'A': 'm.lora_A.weight', 'B': 'm.lora_B.weight'}}
    """
    modules, adapters = {}, set()
    keys = list(keys)  # twice: the pairs, and the message where none is found
    for key in keys:
        match = _LORA_KEY.match(key)
        if match:
            modules.setdefault(match["module"], {})[match["which"]] = key
            adapters.add(match["adapter"])
        elif "lora_embedding" in key:
            raise ValueError(f"{key}: embedding LoRA adapters (lora_embedding_A/B) are "
                             "not supported.")
        elif "lora_magnitude" in key:
            raise ValueError(f"{key}: DoRA adapters (a lora_magnitude_vector) are not "
                             "supported.")
        elif re.search(r"\.lora_diag(?:\.[^.]+)?$", key):  # KaSA: B diag(lora_diag) A
            raise ValueError(f"{key}: KaSA adapters (lora_diag between lora_B and "
                             "lora_A) are not supported.")
        elif _LORA_BIAS.match(key):  # part of the update that B A does not hold
            raise ValueError(f"{key}: LoRA with a trained bias (peft's lora_bias=True) "
                             "is not supported.")
    if len(adapters) > 1:  # a model's full state dict with several adapters loaded
        names = sorted("(none)" if name is None else name for name in adapters)
        raise ValueError(f"keys of {len(adapters)} adapters ({', '.join(names)}): pass "
                         "one adapter's keys (peft.get_peft_model_state_dict(model, "
                         "adapter_name=...)).")
    incomplete = [name for name, keys in modules.items() if set(keys) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"no complete lora_A/lora_B pairs (incomplete: {incomplete}).")
    if not modules:
        near = [k for k in keys if "lora_A" in k or "lora_B" in k][:2]
        raise ValueError("no lora_A/lora_B keys: peft stores each factor as "
                         "'<module>.lora_A.weight' and '<module>.lora_B.weight'" + (
                             f"; these keys are not of that form: {near}" if near else
                             " (none of the keys names a LoRA factor)") + ".")
    return modules


_parse = lora_pairs  # the module's own name for it


def untested_keys(keys: Any) -> list:
    """The tensors of an adapter that are not LoRA factors, sorted.

    peft saves beside the ``lora_A``/``lora_B`` pairs whatever else was trained: whole
    modules (``modules_to_save``, e.g. a classification or language-model head), biases
    (``bias="all"`` or ``"lora_only"``), trainable token rows. CLAIR tests and refines
    the pairs only; these tensors are copied unchanged into the refined adapter, so a
    client can change them at will without being flagged. :func:`refine_adapters`
    warns about them and ``clairstat refine`` lists them in its report.

    Examples
    --------
    >>> untested_keys(["m.lora_A.weight", "m.lora_B.weight", "head.modules_to_save.w"])
    ['head.modules_to_save.w']
    """
    return sorted(key for key in keys if not _LORA_KEY.match(key))


def untested_warning(untested, names=None):
    """One warning line for the clients whose adapters hold untested tensors, or None."""
    holders = [k for k, keys in enumerate(untested) if keys]
    if not holders:
        return None
    names = list(range(len(untested))) if names is None else names
    example = untested[holders[0]]
    shown = ", ".join(example[:3]) + (", ..." if len(example) > 3 else "")
    return (f"{len(holders)} of {len(untested)} clients' adapters hold tensors that are "
            f"not LoRA factors (client {names[holders[0]]}: {len(example)}, {shown}): "
            "they are neither tested nor refined and are copied unchanged, so a "
            "contaminated one goes unseen.")


def adapter_factors(state_dict: Mapping[str, Any], config: Any = None) -> dict:
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
        a_mat = _to_numpy(state_dict[keys["A"]], keys["A"])
        b_mat = _to_numpy(state_dict[keys["B"]], keys["B"])
        if b_mat.ndim != 2 or a_mat.ndim != 2 or b_mat.shape[1] != a_mat.shape[0]:
            raise ValueError(f"{module}: lora_B {b_mat.shape} and lora_A {a_mat.shape}.")
        factors[module] = (lora_scaling(config, module, a_mat.shape[0]) * b_mat, a_mat)
    return factors


def _per_client(value, n_clients, name):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_clients
    if len(values) != n_clients:
        raise ValueError(f"{name}: expected one entry per client ({n_clients}).")
    return values


def module_factors(state_dicts: Sequence[Mapping[str, Any]], configs: Any = None) -> dict:
    """Factors of every client, grouped by module.

    Parameters
    ----------
    state_dicts : list of dict, length n_clients
    configs : LoraConfig, dict, or list of them, optional
        One config for all clients or one per client (ranks and alphas may differ). A
        list gives each client its own config, whose ``r`` (or ``rank_pattern``) must
        be the rank of that client's factors (:func:`check_rank`); one config shared by
        all is not checked against ranks (a federation's clients may differ in rank
        under one ``lora_alpha``: each client's scaling uses its factors' rank), but
        where it states an ``r`` (or ``rank_pattern``) that a client's factors
        contradict a UserWarning names the client: trained with a ``lora_alpha`` of its
        own, it would be read at another size.

    Returns
    -------
    dict of str to list of (ndarray of shape (d_out, r_k), ndarray of shape (r_k, d_in))
        For each module, client k's ``(s_k B_k, A_k)``; every client must adapt the same
        modules, and there must be at least one client (else ValueError).
    """
    if len(state_dicts) == 0:
        raise ValueError("there are no clients: state_dicts is empty.")
    own = isinstance(configs, (list, tuple))  # each client's own config: its r is checked
    configs = _per_client(configs, len(state_dicts), "configs")
    per_client, other_rank = [], []
    for k, (state_dict, config) in enumerate(zip(state_dicts, configs)):
        try:
            per_client.append(adapter_factors(state_dict, config))
            for module, (_, a_mat) in per_client[-1].items():
                if own:
                    check_rank(config, module, a_mat.shape[0])
                elif k not in other_rank and _stated_rank(config, module) not in (
                        None, a_mat.shape[0]):
                    other_rank.append(k)
        except ValueError as error:  # say whose adapter it is
            raise ValueError(f"client {k}: {error}") from None
    message = init_warning(configs if own else configs[:1],
                           [f"client {k}" for k in range(len(configs))] if own
                           else None)
    if message:
        warnings.warn(message, UserWarning, stacklevel=user_stacklevel())
    if other_rank and not _MIXED_RANKS_EXPECTED.get():
        warnings.warn(f"client(s) {other_rank} have factors of another rank than the "
                      "shared config's r (or rank_pattern): their scaling is read from "
                      "the shared lora_alpha and their own rank (alpha / r, or alpha / "
                      "sqrt(r) with use_rslora), which is their training's only if they "
                      "were trained with that lora_alpha; a client trained with its own "
                      "(lora_alpha = 2 r, say) is read at another size and may be "
                      "flagged for it. Pass one config per client (configs=["
                      "LoraConfig.from_pretrained(d) for d in dirs]).", UserWarning,
                      stacklevel=user_stacklevel())
    names = list(per_client[0])
    for k, factors in enumerate(per_client):
        if set(factors) != set(names):
            raise ValueError(f"client {k} adapts modules other than client 0: "
                             f"{module_difference(factors, names)}.")
    return {name: [factors[name] for factors in per_client] for name in names}


def module_difference(modules, reference, shown=3):
    """What ``modules`` lacks of ``reference`` and holds beyond it, the first ``shown``
    of each named (a model has hundreds of modules: listing them all buries the few
    that differ)."""
    modules, reference = set(modules), set(reference)

    def listed(names):
        names = sorted(names)
        return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)"
                                           if len(names) > shown else "")

    missing, extra = reference - modules, modules - reference
    return "; ".join(part for part in (
        f"lacks {len(missing)} ({listed(missing)})" if missing else "",
        f"adds {len(extra)} ({listed(extra)})" if extra else "") if part)


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
    return eckart_young_factors(truncated_svd(np.asarray(reduced), rank), rank, left_basis,
                                right_basis)


def _like(array, template, name="the tensor"):
    """``array`` as the type (torch or numpy) and dtype of ``template``; a ValueError
    (naming ``name``) where finite values do not fit that dtype, instead of inf."""
    with np.errstate(over="ignore"):
        if hasattr(template, "detach"):
            torch = _require("torch", "lora")
            out = torch.as_tensor(np.ascontiguousarray(array)).to(template.dtype)
            overflow = out.is_floating_point() and not bool(torch.isfinite(out).all())
        else:
            out = np.asarray(array, dtype=np.asarray(template).dtype)
            overflow = out.dtype.kind == "f" and not np.all(np.isfinite(out))
    if overflow and np.all(np.isfinite(array)):
        raise ValueError(f"{name}: values up to {float(np.max(np.abs(array))):.3g} do not "
                         f"fit the template's dtype {out.dtype} (they would be "
                         "written as inf).")
    return out


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

    Raises
    ------
    ValueError
        Factors of another rank than the template's, or finite values beyond the
        largest number of the template's dtype (never written as inf).
    """
    out = dict(template)
    for module, keys in _parse(template).items():
        b_mat, a_mat = factors[module]
        expected = tuple(template[keys["A"]].shape)
        if tuple(a_mat.shape) != expected:
            raise ValueError(f"{module}: factors of rank {a_mat.shape[0]} do not fit "
                             f"lora_A {expected}.")
        scale = lora_scaling(config, module, a_mat.shape[0])
        out[keys["A"]] = _like(a_mat, template[keys["A"]], f"{module}: lora_A")
        out[keys["B"]] = _like(b_mat / scale, template[keys["B"]], f"{module}: lora_B")
    return out


def _ranks(factor_lists):
    """Per module, every client's rank there (peft's ``rank_pattern`` gives modules of
    one adapter different ranks)."""
    return {name: [a_mat.shape[0] for _, a_mat in factors]
            for name, factors in factor_lists.items()}


@dataclasses.dataclass
class LoraRefinement(ModuleRefinement):
    """Output of :func:`refine_adapters`: the fit (:class:`ModuleRefinement`, updates
    with the scale included) and the refined adapters.

    Attributes
    ----------
    state_dicts : list of dict, length n_clients
        Refined adapters, rank ``r_k`` each, in the clients' own key layout; a flagged
        client (client-level ``flagged``) gets its own adapter back unchanged.
    untested : list of list of str, length n_clients
        Each client's tensors that are not LoRA factors (:func:`untested_keys`: whole
        ``modules_to_save`` modules, biases, trainable tokens), neither tested nor
        refined, and copied unchanged into ``state_dicts`` (a warning says so).
    """

    state_dicts: list
    untested: list = dataclasses.field(default_factory=list)

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


def _readout_state_dicts(state_dicts, configs, per_client, flagged, ranks, keep=()):
    """Each client's refined updates as factors of its own rank in each module
    (``ranks[module][k]``), in its own layout; the modules in ``keep`` (all updates
    zero) keep the client's own lora_A and lora_B."""
    refined = []
    kept = np.flatnonzero(~np.asarray(flagged, dtype=bool))
    readouts = {name: dict(zip(kept, stack.readouts(kept, [ranks[name][k] for k in kept])))
                for name, stack in per_client.items() if name not in keep}  # batched
    for k, (template, config) in enumerate(zip(state_dicts, configs)):
        if flagged[k]:  # the estimator returns a flagged client's own estimate
            refined.append(dict(template))
            continue
        factors = {name: readouts[name][k] for name in readouts}
        if keep:  # placeholders, then the client's own arrays, exactly
            own = adapter_factors(template, config)
            factors.update({name: own[name] for name in keep})
        try:
            state = factors_to_state_dict(factors, template, config)
        except ValueError as error:  # e.g. a refined lora_B beyond float16's range
            raise ValueError(f"client {k}: {error}") from None
        keys = _parse(template)
        state.update({keys[name][w]: template[keys[name][w]] for name in keep for w in "AB"})
        refined.append(state)
    return refined


def _check_sizes(state_dicts, configs):
    """:func:`check_update_size` on every module of every client (CLAIR's fits square
    the updates), naming the client; on the unscaled factors, so that nothing
    overflows on the way."""
    for k, (state_dict, config) in enumerate(zip(state_dicts, configs)):
        for module, keys in _parse(state_dict).items():
            try:
                a_mat = _to_numpy(state_dict[keys["A"]], keys["A"])
                check_update_size(module, _to_numpy(state_dict[keys["B"]], keys["B"]), a_mat,
                                  lora_scaling(config, module, a_mat.shape[0]))
            except ValueError as error:
                raise ValueError(f"client {k}: {error}") from None


def refine_adapters(state_dicts: Sequence[Mapping[str, Any]], configs: Any = None, *,
                    joint: bool = True, flagged_updates: str | None = None,
                    rank_rule: str | None = None, sample_weight: ArrayLike | None = None,
                    n_jobs: int | None = None, progress: Any = None, device: Any = None,
                    dtype: Any = None, **clair_params: Any) -> LoraRefinement:
    """CLAIR on the clients' LoRA adapters: detect, refine, and write refined adapters.

    Parameters
    ----------
    state_dicts : list of dict, length n_clients
        The clients' adapters (``peft.get_peft_model_state_dict``); ranks may differ.
    configs : LoraConfig, dict, or list of them, optional
        One per client, or one for all (gives the scalings).
    joint : bool, default=True
        Every module is fitted and tested by CLAIR, and a client flagged in more
        modules than a client without contamination would be is flagged
        (:func:`clairstat.aggregation.client_flags`). ``True``: the collaborative clients'
        whole adapters (every module concatenated) are refined together towards their
        mean plus a shared subspace whose rank is chosen by bi-cross-validation across
        modules (``rank=`` fixes it). ``False``: each module is refined by its own fit.
        See :func:`clairstat.aggregation.clair_modules` and docs/method_notes.md,
        section 9 (why the joint refinement is the default).
    flagged_updates : {"clip", "quarantine"}, optional
        With ``joint=True``, what stands in for a collaborative client's update that its
        module's test flags: the update scaled down to the largest norm of the module's
        unflagged clients where it is larger (``"clip"``, the default), or their mean
        (``"quarantine"``, the default before the copying task's comparison,
        docs/method_notes.md, section 9; :func:`clairstat.aggregation.joint_refinement`).
        Giving it with ``joint=False`` is a ValueError.
    rank_rule : {"smallest-error", "one-standard-error"}, optional
        With ``joint=True`` and no ``rank``, how the bi-cross-validation picks the
        joint rank: the rank of the smallest held-out error (the default) or the
        smallest rank within one standard error of it (the default before the copying
        task's pre-registered comparison, docs/method_notes.md, section 9). Giving it
        with ``joint=False`` or with ``rank`` is a ValueError.
    sample_weight : array-like of shape (n_clients,), optional
        Client weights of the collaborative mean (e.g. sample sizes).
    n_jobs : int or None, default=None
        Threads of torch and of the BLAS/OpenMP pools for the whole refinement
        (:func:`clairstat._threads.thread_limits`): ``None`` chooses from the work of
        the largest module (one thread for small adapters, and in a process run under
        ``nice``), ``-1`` uses every usable
        CPU, a positive int that many. With two or more, each module's independent
        eigenproblems (the members' leave-one-out refits, the robust start's chains) run
        on that many Python threads with one BLAS thread each.
    progress : callable, optional
        Called as ``progress(iterable, total=n_modules)`` around the loop over modules
        (the per-module fits) and iterated; ``tqdm.tqdm`` fits.
    device, dtype : optional
        Where and in which precision the decompositions run
        (:func:`clairstat.aggregation.clair_modules`).
    **clair_params
        Parameters of :class:`clairstat.CLAIREstimator` (``rank``, ``test_level``, ...).

    Returns
    -------
    LoraRefinement

    Raises
    ------
    ValueError
        Naming the client (``client k: ...``): among others, a ``lora_alpha`` (or
        ``alpha_pattern`` value) that is not a finite non-zero number, or factors whose
        update is too large for the fits' float64 arithmetic (a norm above
        ``MAX_UPDATE_NORM``, 1e150: the fits square it).

    Notes
    -----
    Per module (the default) each module is reduced exactly (docs/method_notes.md, section 6) to the
    orthonormal basis Q of all ``B_k`` on the left and, on the right, to each client's
    own row basis: ``Delta W_k = Q Y_k W_k^T`` with ``Y_k`` of size at most
    ``sum r_k x r_k``, and the fit has no backbone (LoRA updates are differences from
    the base weights; pass ``backbone=True`` for the (sum r_k x sum r_k) blocks of the
    shared row basis instead). The detection and the refinement run on the factored
    stack (:mod:`clairstat._reduced`), so a 4096 x 4096 module with 50 rank-16 clients
    takes seconds (``benchmarks/RESULTS.md``). The refined update
    ``P Delta W_k + (I - P) mean_C`` generally has rank above ``r_k``; the adapter keeps
    its best rank-``r_k`` approximation (``per_client`` keeps it all).

    A module whose updates are all exactly zero (every client's ``lora_B`` or
    ``lora_A`` is 0, as in adapters peft has just initialised) is not fitted: nobody is
    flagged in it, its refined updates and mean are 0, and every client keeps its own
    ``lora_A`` and ``lora_B`` there (a readout would set ``A = 0`` too, and LoRA cannot
    train from ``A = B = 0``); such modules do not vote in the client-level flags. With
    ``joint=True`` a zero module keeps the clients' own factors as well.

    On the copying experiment (``simulations/copying/PROTOCOL.md`` and its results)
    per-module refinement keeps most of each client's noise, which lives in the same
    column spaces as the shared signal; the joint refinement removes it.
    """
    factor_lists = module_factors(state_dicts, configs)  # a list: each client's r checked
    configs = _per_client(configs, len(state_dicts), "configs")
    _check_sizes(state_dicts, configs)
    untested = [untested_keys(state_dict) for state_dict in state_dicts]
    message = untested_warning(untested)
    if message:
        warnings.warn(message + " (LoraRefinement.untested lists them)", UserWarning,
                      stacklevel=2)
    with thread_limits(n_jobs, modules_work(factor_lists)):
        fit = clair_modules(factor_lists, sample_weight, joint=joint,
                            flagged_updates=flagged_updates, rank_rule=rank_rule,
                            progress=progress, device=device, dtype=dtype, **clair_params)
        refined = _readout_state_dicts(state_dicts, configs, fit.per_client, fit.flagged,
                                       _ranks(factor_lists), keep=fit.zero_modules)
    return LoraRefinement(**vars(fit), state_dicts=refined, untested=untested)


def aggregate_adapters(rule: str, state_dicts: Sequence[Mapping[str, Any]], configs: Any = None,
                       weights: ArrayLike | None = None, **options: Any) -> dict:
    """Any rule of :func:`clairstat.aggregation.aggregate` on every module of the adapters
    (:func:`clairstat.aggregation.aggregate_modules`: ``"clair"`` is the library default,
    per-module tests and the joint refinement; ``joint=False`` for one fit per module).

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
    factor_lists = module_factors(state_dicts, configs)  # a list: each client's r checked
    configs = _per_client(configs, len(state_dicts), "configs")
    reference = options.pop("reference", None)
    if isinstance(reference, dict):
        reference = adapter_factors(reference, configs[0])
    if reference is not None:
        options["reference"] = reference
    return aggregate_modules(rule, factor_lists, weights, **options)


def global_state_dict(results: Mapping[str, Any], template: Mapping[str, Any],
                      config: Any = None) -> dict:
    """The global update of every module as an adapter of the template's rank.

    Parameters
    ----------
    results : dict of str to AggregationResult
        From :func:`aggregate_adapters`.
    template : dict
        State dict of the receiving adapter (keys, dtypes, rank): each module is read
        out at its rank there (an adapter of another rank is another template).
    config : LoraConfig or dict, optional

    Returns
    -------
    dict
        The best rank-``r`` factors of each module's ``update`` (a thin SVD of the dense
        (d_out, d_in) update; rules with their own factors of the right rank use them,
        unless those factors leave part of the update out: fedex's mean factors leave
        out its residual, which FedEx-LoRA folds into the frozen weights and an adapter
        cannot carry, so its adapter is the best rank-``r`` readout of its exact update;
        writing its mean factors gave FedIT's adapter, a review).
        A zero update (fresh adapters) at the template's rank gives ``B = 0`` and the
        template's own ``A``, which keeps the adapter trainable (a readout's ``A = 0``
        would not), unless the rule has its own non-zero ``A`` (fedit's mean ``A``).
    """
    factors = {}
    for module, keys in _parse(template).items():
        result = results[module]
        module_rank = template[keys["A"]].shape[0]
        residual = result.extras.get("residual")
        own_factors = (result.factors is not None
                       and result.factors[0].shape[1] == module_rank
                       and (residual is None or not np.any(residual)))
        if not np.any(result.update) and not (own_factors and np.any(result.factors[1])):
            factors[module] = (np.zeros((result.update.shape[0], module_rank)),
                               _to_numpy(template[keys["A"]]))
        elif own_factors:
            factors[module] = result.factors
        else:
            update = np.asarray(result.update, dtype=np.float64)
            factors[module] = eckart_young_factors(truncated_svd(update, module_rank),
                                                   module_rank)
    return factors_to_state_dict(factors, template, config)


def personalized_state_dicts(results: Mapping[str, Any],
                             state_dicts: Sequence[Mapping[str, Any]],
                             configs: Any = None, *,
                             flagged_receive: str = "own") -> tuple[list, np.ndarray | None]:
    """Each client's own adapter from any rule's per-module results.

    Parameters
    ----------
    results : dict of str to AggregationResult
        From :func:`aggregate_adapters` on ``state_dicts``.
    state_dicts : list of dict, length n_clients
        The clients' adapters (keys, dtypes and ranks of the outputs).
    configs : LoraConfig, dict, or list of them, optional
    flagged_receive : {"own", "global"}, default="own"
        What a flagged client gets: its own adapter (as the estimator refines it), or
        the global update at its rank (:func:`global_state_dict`), as every client of
        a non-personalized rule does. Over several rounds a flagged client that trains
        on from its own adapter drifts from the refined ones and tends to be flagged
        again; ``"global"`` lets a false alarm end with the round, and lets an
        attacker restart from the global adapter, where it was caught less often
        (measured in ``simulations/studies/rounds_detection.py``).

    Returns
    -------
    state_dicts : list of dict
        Where every module's result carries per-client refined updates (the
        ``per_client`` extra, as ``"clair"`` does), client k's refined updates at its
        rank, as :func:`refine_adapters` reads them out: a client
        flagged (:func:`clairstat.aggregation.client_flags` on the ``flagged`` extras of
        the modules whose updates are not all zero) gets its own adapter back, and
        modules whose updates are all zero keep every client's own factors. Otherwise
        each client gets the global update at its rank (:func:`global_state_dict`).
    flagged : ndarray of shape (n_clients,), bool, or None
        The client-level flags; ``None`` when the rule flags nobody by design.
    """
    if flagged_receive not in ("own", "global"):
        raise ValueError(f"flagged_receive must be 'own' or 'global', got {flagged_receive!r}.")
    given, configs = configs, _per_client(configs, len(state_dicts), "configs")
    _check_client_count(results, len(state_dicts))
    if not all("per_client" in result.extras for result in results.values()):
        if isinstance(given, (list, tuple)):  # each client's own config: its r checked
            module_factors(state_dicts, given)
        return [global_state_dict(results, state, config)
                for state, config in zip(state_dicts, configs)], None
    factor_lists = module_factors(state_dicts, given)  # a list: each client's r checked
    _check_same_clients(results, factor_lists)
    zero = frozenset(name for name, factors in factor_lists.items()
                     if all(not np.any(b) or not np.any(a) for b, a in factors))
    voting = [result for name, result in results.items()
              if name not in zero and "flagged" in result.extras]
    level = voting[0].estimator.test_level if voting else 0.05  # no vote: any level
    flagged = client_flags(np.reshape([result.flagged for result in voting],
                                      (len(voting), len(state_dicts))), level)
    per_client = {name: result.per_client for name, result in results.items()}
    personal = _readout_state_dicts(state_dicts, configs, per_client, flagged,
                                    _ranks(factor_lists), keep=zero)
    if flagged_receive == "global":
        personal = [global_state_dict(results, state, config) if flag else own
                    for own, state, config, flag in zip(personal, state_dicts, configs,
                                                        flagged)]
    return personal, flagged


def _check_client_count(results, n_clients):
    """A ValueError where a rule's results hold another number of clients (their
    weights, one per client) than ``n_clients``."""
    for result in results.values():
        if len(result.weights) != n_clients:
            raise ValueError(f"results were computed on {len(result.weights)} clients; "
                             f"state_dicts has {n_clients}: pass the state dicts the "
                             "results were computed on.")


def _check_same_clients(results, factor_lists):
    """A ValueError where ``results`` were not computed on these clients in this order
    and with these configs: other modules, or a client whose scaled update's norm
    differs from the one in the results' per-client stack (``||s B A||_F^2 =
    tr(s^2 B^T B A A^T)``, r^2 (d_out + d_in) flops per client, against ``tr(Y^T Y R
    R^T)`` there). Norms only: a client replaced by another of the same norm (its B
    negated, say) passes."""
    if set(results) != set(factor_lists):
        raise ValueError("results and state_dicts hold different modules: "
                         f"{module_difference(factor_lists, results)}.")
    n_clients = len(next(iter(factor_lists.values())))
    for name, result in results.items():
        theirs = _own_update_norms(getattr(result.extras.get("per_client"), "reduced", None))
        if theirs is None or len(theirs) != n_clients:
            continue
        ours = np.sqrt(np.abs([np.sum((b.T @ b) * (a @ a.T)) for b, a in factor_lists[name]]))
        # The float64 reduction keeps norms to 1e-9 relative (its bases are orthonormal
        # to 2^-30, _reduced._ORTHO_TOL); a float32 one (dtype="float32") to about 1e-7
        # (a review measured 8e-8): 1e-6 of the largest update tells clients apart.
        differ = np.flatnonzero(np.abs(ours - theirs) > 1e-6 * max(ours.max(), theirs.max()))
        if differ.size:
            k = differ[0]
            raise ValueError(f"{name}: client {k}'s update (norm {ours[k]:.6g}) is not the "
                             f"one the results were computed on (norm {theirs[k]:.6g}): "
                             "pass the state dicts and configs given to "
                             "aggregate_adapters, in the same order.")


def _own_update_norms(reduced):
    """Each client's own update's Frobenius norm, from the factors a rule's per-client
    stack keeps in reduced coordinates (``None`` for another kind of stack)."""
    if hasattr(reduced, "stack"):  # FactoredRefined: X_k = Y_k R_k
        coef, rights = reduced.stack.coef, reduced.stack.rights
        return np.sqrt(np.abs(np.einsum("kpr,kps,krt,kst->k", coef, coef, rights, rights)))
    if hasattr(reduced, "ranks"):  # CombinedUpdates: Y [:, block_j] Z [block_j, :]
        bounds = np.cumsum(np.r_[0, reduced.ranks])
        return np.sqrt(np.abs([np.sum((reduced.left[:, i:j].T @ reduced.left[:, i:j])
                                      * (reduced.right[i:j] @ reduced.right[i:j].T))
                               for i, j in zip(bounds[:-1], bounds[1:])]))
    return None


def save_adapter(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Save an adapter state dict of torch tensors with safetensors (no pickle)."""
    safetensors_torch = _require("safetensors.torch", "lora")
    safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))


def load_adapter(path):
    """Load an adapter saved by :func:`save_adapter` (safetensors: never unpickles).

    ``path`` is a ``.safetensors`` file, or a peft adapter folder (as
    ``save_pretrained`` writes it), whose ``adapter_model.safetensors`` is read. A
    folder without that file, or a missing path, raises ``FileNotFoundError`` naming
    what was looked for (safetensors itself answered a folder with ``OSError: No such
    device``; a newcomer's review).
    """
    safetensors_torch = _require("safetensors.torch", "lora")
    path = Path(path)
    if path.is_dir():
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            found = sorted(p.name for p in path.iterdir())[:8]
            raise FileNotFoundError(
                f"{path} is a folder without adapter_model.safetensors (what peft's "
                f"save_pretrained writes; it holds {found or 'nothing'}): pass the "
                "folder of a peft adapter or a .safetensors file.")
        path = weights
    elif not path.is_file():
        raise FileNotFoundError(f"no adapter at {path}: pass a .safetensors file or a "
                                "peft adapter folder.")
    return safetensors_torch.load_file(str(path))
