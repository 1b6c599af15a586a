"""A Flower strategy that aggregates LoRA adapters with any clairstat rule, CLAIR included.

Clients send their peft adapter (``get_peft_model_state_dict``) as an ``ArrayRecord``
with a ``MetricRecord`` holding their example count. The server maps the adapters to
per-module updates and runs the rule on every module
(:func:`clairstat.lora.aggregate_adapters`, the same path for ``"clair"`` and every
other rule) and returns the global adapter. With ``personalized=True`` every client
receives, in the next round's messages (train and evaluate), its own adapter
(:func:`clairstat.lora.personalized_state_dicts`): for CLAIR its refined one, as
:func:`clairstat.lora.refine_adapters` gives it (by default every module tested and the
whole adapter refined jointly; ``rule_options={"joint": False}`` refines each module by
its own fit; a flagged client gets its own adapter back), for the other rules the
global update read out at that client's rank.

One malformed reply does not abort the round: it is dropped, logged and counted (see
:class:`LoraStrategy`; a round left with fewer valid replies than its rule needs is
skipped, as FedAvg skips a round without replies), no client's example count can claim
more than ``max_weight_ratio`` times the median claim, no client holds more than
``max_weight_share`` (1/3) of the round's weight, and, for the rules a weight majority
decides (median, trimmed_mean, geomedian, krum), no group of fewer than half of the
replies holds half of it (:func:`cap_weights` with ``minority=True``).

Importing this module needs Flower (``pip install clairstat[flower,lora]``).

Examples
--------
Inside a Flower ``ServerApp``::

    strategy = LoraStrategy(rule="clair", lora_config=peft_config, personalized=True,
                            rule_options={"test_level": 0.05})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_adapter),
                            num_rounds=3)
    strategy.flagged_          # {node_id: bool} of the last round
"""

from __future__ import annotations

import collections
import logging
import math

import numpy as np

try:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("clairstat.integrations.flower needs Flower: "
                      "pip install clairstat[flower,lora]") from error

from ..aggregation._rules import a_outliers
from ..aggregation._validation import _REAL_KINDS, _check_size
from ..lora import (adapter_factors, aggregate_adapters, global_state_dict, lora_scaling,
                    mixed_ranks_expected, personalized_state_dicts, untested_keys)

__all__ = ["LoraStrategy", "arrays_to_state_dict", "state_dict_to_arrays", "cap_weights"]

_LOGGER = logging.getLogger(__name__)


def arrays_to_state_dict(record):
    """An ``ArrayRecord`` as a dict of numpy arrays (Flower loads them with
    ``np.load(allow_pickle=False)``: no pickle is ever read)."""
    return {key: array.numpy() for key, array in record.items()}


def state_dict_to_arrays(state_dict):
    """A dict of numpy arrays or torch tensors as an ``ArrayRecord``.

    bfloat16 tensors (the usual dtype of LLM adapters), which numpy and Flower's
    ``Array`` cannot hold, are sent as float32, which represents every bfloat16 value
    exactly.
    """
    arrays = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu()
            if str(value.dtype) == "torch.bfloat16":
                value = value.float()
            value = value.numpy()
        arrays[key] = Array(np.ascontiguousarray(value))
    return ArrayRecord(arrays)


def _power_of_two_scale(values):
    """A power of two to divide the positive ``values`` by, exactly: the largest quotient
    at most 2**1000 (n of them sum without overflow), and as near the middle of the
    values' range (in log scale) as that allows, so that claims 1e310 apart both stay
    normal floats (over the largest, 1e-310 lost precision as a subnormal)."""
    positive = values[values > 0]
    if positive.size == 0:
        return 1.0
    top, bottom = np.frexp(positive.max())[1], np.frexp(positive.min())[1]
    # At most 2**1023, the largest power of two float64 holds: with every value above
    # 2**1023 the middle exponent was 1024, the scale inf and every weight 0 (a review).
    return float(np.ldexp(1.0, min(max(int(top) - 1000, (int(top) + int(bottom)) // 2),
                                   1023)))


def cap_weights(claims, max_ratio=10.0, max_share=1 / 3, minority=False):
    """Relative client weights: each claim over the median positive claim, capped at
    ``max_ratio``, then at a common level that keeps every client's share of the total
    weight at most ``max_share``.

    Parameters
    ----------
    claims : array-like of shape (n_clients,)
        Finite non-negative example counts, as the clients report them (a claim of 0
        weighs 0; where every claim is 0 the weights are equal).
    max_ratio : float or None, default=10.0
        Cap, in multiples of the median positive claim (``None``: no cap).
    max_share : float or None, default=1/3
        Largest share of the total weight one client may hold (``None``: no such cap).
        With fewer than ``1 / max_share`` clients claiming any example the largest
        share is one over their number (a claim of 0 weighs 0).
    minority : bool, default=False
        Also cut the weights so that no group of fewer than half of the clients holds
        half of the weight (:func:`_minority_capped`): for rules that a weight majority
        decides (weighted median, trimmed mean, geometric median, Krum).

    Returns
    -------
    ndarray of shape (n_clients,)
        ``w_k = min(v_k, t)`` with ``v_k = min(n_k / median(n_j > 0), max_ratio)``
        (without the ratio cap ``v_k = n_k / c``, ``c`` a power of two between the
        smallest and largest claims): scale-free (only ratios matter to a weighted
        mean) and never overflowing, however large or small the claims. With
        ``s = max(max_share, 1 / n_positive)`` (``n_positive`` the clients whose claim
        is positive), the level ``t`` solves ``t = s * sum_j min(v_j, t)`` (``t = inf``,
        no cap, where every ``v_k <= s * sum_j v_j``), so that no client holds more than
        ``s`` of the total weight: with the defaults and 3 or more clients of positive
        claims at most 1/3, so that a weighted median or geometric median never
        returns one client's update because of its
        claim (the median cap alone let one client among 11 or fewer hold more than
        half: a review). Two clients get equal weights. With ``minority`` a third cut,
        at a common level, keeps the heaviest minority (the ``ceil(n / 2) - 1`` largest
        weights) at most ``1/2 - 1/(4n)`` of the total (:func:`_minority_capped`): a
        group of clients claiming huge counts cannot make a weighted median theirs
        either (2 of 7 such claims held 0.667 of the weight before it, a review). It is
        inactive where the claims are equal. Only with ``minority``: it flattens honest
        clients' unequal counts too, which a rule that averages should keep.

    Examples
    --------
    >>> cap_weights([10, 10, 10, 10, 1e308], max_share=None).tolist()
    [1.0, 1.0, 1.0, 1.0, 10.0]
    >>> cap_weights([10, 10, 10, 10, 1e308]).tolist()  # 2 of 6: a third
    [1.0, 1.0, 1.0, 1.0, 2.0]
    """
    claims = np.asarray(claims, dtype=float)
    positive = claims[claims > 0]
    if positive.size == 0:  # nobody claims an example: equal weights
        return np.ones_like(claims)
    if max_ratio is None:  # claim / median overflowed to inf where the median was tiny
        relative = claims / _power_of_two_scale(claims)  # (1e10 among 1e-300): a review
    else:  # the median as lo + (hi - lo) / 2: two claims of 1e308 cannot sum to inf, and
        # subnormal claims are not halved to 0 (the median of halves, doubled, was 0
        # where most claims were 5e-324, and every claim then weighed max_ratio: a review).
        # The median of the positive claims: where most clients claimed 0 the median was
        # 0, a claim of 0 over it NaN, and every client then weighed alike
        lo, hi = np.sort(positive)[[(positive.size - 1) // 2, positive.size // 2]]
        with np.errstate(over="ignore"):  # inf over a tiny median: capped just below
            relative = np.minimum(claims / (lo + (hi - lo) / 2.0), max_ratio)
    if max_share is None:
        return relative
    # the share is among the clients that claim any example: with the cap at 1/3, two
    # positive claims beside a zero one cannot both hold a third, and the level fell to 0
    # (every weight 0, then all made 1: [0, 5, 5] -> [1, 1, 1], the zero claim weighed
    # as the others). Claims that are positive but underflow against the others count
    # (their relative weight is 0, not their claim): one huge claim beside tiny ones
    # still holds at most the share (a review)
    share = max(max_share, 1.0 / max(int(np.count_nonzero(claims > 0)), 1))
    # Cap the m largest weights at t = share (m t + rest[m]) = rest[m] / (1 / share - m),
    # rest[m] the sum of the others, for the smallest m at which the (m + 1)-th largest
    # weight is at most t (m = 0: no weight above share times the total, none capped).
    scale = _power_of_two_scale(relative)  # exact: sums cannot overflow
    ordered = np.sort(relative / scale)[::-1]
    rest = np.cumsum(ordered[::-1])[::-1]
    level = ordered[-1]  # every weight equal: reached only through rounding
    for m in range(relative.size):
        if 1.0 / share - m <= 0.0:
            break
        if rest[m] / (1.0 / share - m) >= ordered[m]:
            level = rest[m] / (1.0 / share - m)
            break
    capped = np.minimum(relative, level * scale)
    capped = capped if capped.max() > 0 else np.ones_like(capped)  # 0: the tiniest underflow
    return _minority_capped(capped) if minority else capped


def _minority_capped(weights):
    """``weights`` cut at a common level so that the heaviest minority (the
    ``ceil(n / 2) - 1`` largest weights) holds at most ``1/2 - 1/(4n)`` of the total:
    strictly less than half (no tie for a weighted median), and more than equal weights
    give it (``1/2 - 1/(2n)`` or less: inactive for equal claims).

    The per-client caps bound one claim; a group did not (a review: 2 of 7 replies
    claiming 1e308 examples held 0.667 of the weight and a weighted median returned
    their update exactly; 3 of 11, 0.789). With this cap no group of fewer than half of
    the replies holds half of the weight, so a weighted median or geometric median is
    never theirs because of their claims. The share of the top ``m`` weights under a
    common cut ``t`` rises with ``t`` (cutting moves weight from the top to no one, or
    from every capped client alike), so the level is found by bisection between the
    smallest positive weight (equal weights among the positive ones) and the largest
    (no cut). A weight of 0 stays 0; where too few weights are positive for any cut to
    reach the bound, the positive ones are made equal.
    """
    n = weights.size
    minority = (n + 1) // 2 - 1
    if minority == 0:
        return weights
    bound = 0.5 - 0.25 / n
    scaled = weights / weights.max()

    def top_share(level):
        cut = np.minimum(scaled, level)
        return np.sort(cut)[-minority:].sum() / cut.sum()

    if top_share(1.0) <= bound:
        return weights
    # from the smallest positive weight (equal weights among the positive ones): a weight
    # of 0 (a claim that underflows against the others) stays 0, and the cut never takes
    # every weight to 0 (a review: 3 of 7 claims of 5e-324 made the bisection return
    # all zeros, and the round was skipped)
    low, high = scaled[scaled > 0].min(), 1.0
    if top_share(low) > bound:  # too few positive weights: equal among them is the most
        return np.minimum(scaled, low) * weights.max()
    for _ in range(200):  # to float64's resolution of the level
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if top_share(middle) <= bound:
            low = middle
        else:
            high = middle
    return np.minimum(scaled, low) * weights.max()


# Rules that need every client at the same rank: for them a reply's ranks are part of
# the shapes it must share with most replies.
_EQUAL_RANK_RULES = {"fedit", "ffa", "fedex", "fedrot"}
# Rules whose answer a weight majority decides: their weights get the minority cut too
# (cap_weights(minority=True)), so that a group claiming huge counts cannot decide them.
_MAJORITY_RULES = {"median", "trimmed_mean", "geomedian", "krum"}


class _MalformedReply(ValueError):
    """A reply this strategy cannot aggregate (the message says why)."""


def _shape_and_kind(array):
    """A tensor's shape, followed by ``"integer"`` or ``"bool"`` where it holds no
    floating-point numbers (replies must agree on both to share the global tensor)."""
    kind = {"b": "bool", "i": "integer", "u": "integer"}.get(array.dtype.kind)
    return array.shape if kind is None else (*array.shape, kind)


def _metric_layout(content, skip):
    """The reply's metric names (but ``skip``, the count), each with its list's length
    or None, sorted: the replies averaged together must share it."""
    return tuple(sorted((key, len(value) if isinstance(value, list) else None)
                        for record in content.metric_records.values()
                        for key, value in record.items() if key != skip))


def _non_finite_metrics(content, skip):
    """The keys of the reply's metrics (but ``skip``, the count) whose value, or a value
    of whose list, is not a finite number."""
    bad = []
    for record in content.metric_records.values():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if key != skip and not all(isinstance(v, (int, float)) and math.isfinite(v)
                                       for v in values):
                bad.append(key)
    return bad


def _untested_median(global_state, adapters):
    """The global adapter's tensors that are not LoRA factors (``modules_to_save``
    modules, biases, trainable tokens: no rule tests them) as their coordinate-wise
    median over the replies that hold them at the first reply's shape, instead of the
    first reply's own (which every client then received: a review found one client's
    poisoned head sent to all). The strategy's screen has already dropped the replies
    whose such tensors are not finite real numbers, or whose keys and shapes differ from
    those most replies share, so every reply holds them at one shape. Logged once per
    call."""
    keys = untested_keys(global_state)
    for key in keys:
        reference = np.asarray(global_state[key])
        stack = [np.asarray(adapter[key]) for adapter in adapters
                 if key in adapter and np.shape(adapter[key]) == reference.shape]
        global_state[key] = np.median(np.stack(stack).astype(np.float64), axis=0).astype(
            reference.dtype)
    if keys:
        _LOGGER.warning("%d tensors beside the LoRA pairs (%s%s) are not tested by any "
                        "rule: the global adapter takes their coordinate-wise median over "
                        "the replies", len(keys), ", ".join(keys[:3]),
                        ", ..." if len(keys) > 3 else "")
    return global_state


def _check_rule(rule, options):
    """The rule's name and its options' names (and krum's integers), checked when the
    strategy is built: an unknown rule or option failed only at round 1 (a review); then
    their values, by a dry run (:func:`_dry_run`)."""
    import inspect

    from .. import CLAIREstimator
    from ..aggregation._api import RULES
    from ..aggregation._validation import check_integer

    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid rules: {', '.join(RULES)}.")
    if rule == "clair":
        known = {"joint", "flagged_updates", "rank_rule", "progress", "device", "dtype",
                 *CLAIREstimator().get_params()}
    else:
        known = set(list(inspect.signature(RULES[rule]).parameters)[2:])
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"rule_options {unknown} are not options of rule {rule!r}; its "
                         f"options: {', '.join(sorted(known)) or 'none'}.")
    for name in ("n_byzantine", "multi"):  # multi=None, accepted, failed at round 1
        if rule == "krum" and (options.get(name) is not None or name == "multi"
                               and name in options):
            check_integer(name, options[name])
            if options[name] < (0 if name == "n_byzantine" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'n_byzantine' else 1}, "
                                 f"got {options[name]}.")
    # One noise scale per client follows the clients' positions, which a federation's
    # replies do not keep: their order and number change from round to round (a
    # sampled node, a failed one, a dropped reply), so scale i went to whichever reply
    # came i-th, and a round with one reply fewer failed (a review).
    if rule == "clair" and np.ndim(options.get("noise_scale")) > 0:
        raise ValueError("noise_scale: one number for every client; a scale per client "
                         "cannot follow Flower's replies, whose order and number change "
                         "from round to round.")
    # before the dry run, which runs a positive rank as 1 (its message would name rank=1)
    if rule == "clair" and options.get("rank_rule") is not None \
            and options.get("rank") is not None:
        raise ValueError(f"rank_rule={options['rank_rule']!r} chooses the joint rank, "
                         f"which rank={options['rank']!r} fixes: give one of them.")
    _dry_run(rule, options)


def _dry_run(rule, options):
    """The rule with ``options`` on a small synthetic federation (rank-1 updates of one
    module, with one shared A), so that an invalid value fails when the strategy is built: a trim of 0.7,
    a lam of 2, a test_level of 2 or CLAIR's device "cuda" on a server without one
    failed at the first aggregation, after every client had trained a round (a review).

    The options that depend on the real federation are left to the rounds: fedrot's
    ``reference`` (the modules' shapes), CLAIR's ``rank`` (a positive one is run as 1:
    the largest a federation supports depends on its clients), and krum's
    ``n_byzantine`` or ``multi`` and glora's ``readout_rank`` beyond what a small
    federation holds (64 clients, 1024 x 1024). The ValueError gives the rule's message.
    """
    import copy
    import warnings

    from ..aggregation._modules import aggregate_modules

    options = {key: value for key, value in options.items()
               if key not in ("reference", "progress")}
    # A RandomState given as random_state is drawn from by the fit: the dry run draws
    # from a copy, so that the first round's fit is the one it would be without it.
    if "random_state" in options:
        options["random_state"] = copy.deepcopy(options["random_state"])
    n_clients, size = 6, 4
    if rule == "krum":
        n_clients = max(n_clients, 2 * (options.get("n_byzantine") or 0) + 3,
                        options.get("multi", 1))
    readout = options.get("readout_rank") if rule == "glora" else None
    # numpy's integers too (glora takes np.int64(8); the 4 x 4 run refused it)
    if isinstance(readout, (int, np.integer)) and not isinstance(readout, bool) \
            and readout > size:
        size = int(readout)
    if n_clients > 64 or size > 1024:
        return
    rank = options.get("rank") if rule == "clair" else None
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool) and rank > 0:
        options["rank"] = 1
    rng = np.random.default_rng(0)
    a_mat = rng.standard_normal((1, size))  # one A for all: ffa's frozen A
    factors = [(rng.standard_normal((size, 1)), a_mat) for _ in range(n_clients)]
    with warnings.catch_warnings():  # e.g. trimmed_mean's on few clients: not this one's
        warnings.simplefilter("ignore")
        try:
            aggregate_modules(rule, {"module": factors}, None, **options)
        except Exception as error:  # noqa: BLE001 - a device's AssertionError too
            raise ValueError(f"rule_options of rule {rule!r} fail on a small synthetic "
                             f"federation, as they would at the first round: "
                             f"{error}") from error


class LoraStrategy(FedAvg):
    """FedAvg's message flow with a clairstat aggregation rule on LoRA adapters.

    Parameters
    ----------
    rule : str, default="clair"
        ``"clair"`` or any rule of :func:`clairstat.aggregation.aggregate`; an unknown
        name raises ValueError here, not at the first round.
    lora_config : peft.LoraConfig or dict, optional
        The clients' LoRA config (gives the scaling ``lora_alpha / r``); ``None`` takes
        the factors as they are.
    personalized : bool, default=True
        Send each client its own adapter (refined by CLAIR, or the global update at its
        rank) instead of one global adapter for all. Needed when ranks differ.
    rule_options : dict, optional
        Options of the rule (for ``"clair"``: ``joint``, ``flagged_updates``,
        ``rank_rule`` and the parameters of :class:`clairstat.CLAIREstimator`, as
        :func:`clairstat.lora.refine_adapters` takes them). Names that are not the
        rule's options (and for krum an ``n_byzantine`` or ``multi`` that is not a
        non-negative, resp. positive, integer) raise ValueError here.
    max_weight_ratio : float or None, default=10.0
        Weight cap: a client's weight is its example count (the ``weighted_by_key``
        metric) over the median count of the round's valid replies, capped at this
        ratio (:func:`cap_weights`). A client claiming 1e308 examples among clients
        claiming about 100 weighs at most as 10 median clients, not all of the round.
        ``None`` disables this cap (the counts are then divided by a power of two between
        the smallest and largest count, so that no ratio of claims can overflow). The
        capped weights also weight FedAvg's metric averages.
    flagged_receive : {"own", "global"}, default="own"
        In personalized mode, what a client flagged by CLAIR receives: its own adapter,
        or the global adapter at its rank
        (:func:`clairstat.lora.personalized_state_dicts`). With ``"own"`` a false alarm
        tends to repeat in the next rounds (the client trains on alone and drifts from
        the refined clients); ``"global"`` ends it with the round, at a cost in
        detection: attackers that restart from the global adapter were caught less often
        (``simulations/studies/rounds_detection.py``; docs/method_notes.md, section 8).
    max_weight_share : float or None, default=1/3
        Second cap, after ``max_weight_ratio``: the weights above a common level are cut
        to it, the level chosen so that no client holds more than this share of the
        round's total weight (:func:`cap_weights`; ``1 / n`` with ``n`` valid replies
        where that is larger: two replies weigh equally). Must be below 1/2, so that no
        claim makes one client the weighted median or geometric median alone (with 6
        clients, the ratio cap alone left a claim of 1e308 with 10/15 of the weight).
        With ``rule`` median, trimmed_mean, geomedian or krum a third cut keeps the
        heaviest minority of the replies below half of the weight (2 of 7 replies
        claiming 1e308 held 0.667 of it, and the median was their update: a review);
        it flattens honest clients' unequal counts where a few hold most of them.
        ``None`` disables it.
    **fedavg_options
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``min_available_nodes``, ``weighted_by_key``, ...).

    Attributes
    ----------
    client_arrays_ : dict of int to ArrayRecord
        The adapter each node receives next (personalized mode); a node whose reply was
        dropped receives the global adapter.
    flagged_ : dict of int to bool
        CLAIR's flags of the last round that aggregated, by node id (empty for other
        rules).
    flagged_history_ : dict of int to dict of int to bool
        CLAIR's flags of every round that aggregated: ``{round: {node_id: flag}}``.
    failed_ : dict of int to str
        The rounds skipped because the rule failed on their valid replies, with the
        rule's message (clients named by node id).
    dropped_ : dict of int to dict of int to str
        Per server round, the dropped train replies: ``{round: {node_id: reason}}``.
    dropped_evaluate_ : dict of int to dict of int to str
        The same for the evaluation replies (:meth:`aggregate_evaluate`).
    weights_ : dict of int to float
        The last round's normalised client weights (after the caps), by node id.
    last_results_ : dict of str to AggregationResult
        The last round's clairstat output, per module (for CLAIR each result holds the
        fitted estimator, the flags and the refined updates).

    Notes
    -----
    **Malformed replies.** Every reply of a node that sends more than one reply without
    a Flower error in a round is dropped, in training and in evaluation (which of them
    is its own is unknown; the node counts once in ``n-dropped``). A reply is dropped,
    not aggregated, when it lacks exactly one ArrayRecord and one MetricRecord, its
    count (``weighted_by_key``) is missing or not a finite positive number, any of its
    tensors (the LoRA factors and those beside them) has a dtype that is not real
    numbers or holds a non-finite value, its adapter has no complete
    ``lora_A``/``lora_B`` pairs, a factor that is not 2-D, inner dimensions that do not
    match, a module of rank 0 or of a rank above ``min(d_out, d_in)`` (which adds
    nothing to the update but the rules' time and memory), values so large that ``B A``
    may overflow, or an
    update too large for the rules' float64 arithmetic (``scale x lora_B``, ``lora_A`` or
    their product of a norm above 1e150, the bound of
    :func:`clairstat.aggregation.aggregate`), when its modules and their (d_out, d_in)
    shapes (and ranks, for the rules that need equal ranks: fedit, ffa, fedex, fedrot),
    and the keys and shapes of its tensors beside the LoRA pairs, differ from those most
    replies share, under rule ``ffa`` when a module's ``lora_A`` differs from the frozen A
    most replies share, or when a tensor holds values beyond the largest number of a floating
    dtype the valid replies give that tensor (the outputs are written in the replies'
    dtypes: a float64 value of 1e40 cannot be written as float32, and is not written as
    inf). Each dropped reply is logged
    (logger ``clairstat.integrations.flower``, level WARNING, with the node id and the
    reason), recorded in ``dropped_`` and reported in the round's train metrics as
    ``n-dropped`` (count) and ``dropped-nodes`` (node ids). The round goes on with the other
    replies. When fewer valid replies remain than the rule needs (2, and for ``krum``
    ``2 n_byzantine + 3``, 3 without ``n_byzantine``, which then is derived from the
    count, and at least ``multi``), the round is skipped before aggregating, as FedAvg
    skips a round without replies: a WARNING, metrics ``skipped`` and ``n-valid``, and
    the previous round's adapters stay (no exception ends the run). Replies that
    carry a Flower error (a client's exception, or an error the link reports, such as a
    message whose time to live ran out; a reply that never arrives within the round's
    timeout is not one and is not counted) are logged by FedAvg as failures and counted
    in the round's metrics as ``n-failed`` and ``failed-nodes`` (a round in which every
    reply failed is skipped with those metrics). A fresh adapter
    (``lora_B = 0``) is a valid zero update, not malformed.
    Evaluation replies are screened for their count and metrics alike
    (:meth:`aggregate_evaluate`). A train reply whose metrics (a loss) hold a NaN or an
    infinite value keeps its adapter in the aggregation, but its metrics are left out of
    the round's metric average (logged, and listed in ``metrics-left-out-nodes``), as are
    the metrics of a train or evaluation reply whose metric names, or list lengths,
    differ from those most replies share (FedAvg's own check, which this strategy turns
    off to drop replies one by one).

    **Tensors beside the LoRA pairs** (``modules_to_save`` modules, biases, trainable
    tokens) are not tested by any rule: the global adapter takes their coordinate-wise
    median over the valid replies (logged at WARNING), and each client's personalized
    adapter keeps its own.
    """

    def __init__(self, rule="clair", lora_config=None, personalized=True,
                 rule_options=None, max_weight_ratio=10.0, flagged_receive="own",
                 max_weight_share=1 / 3, **fedavg_options):
        super().__init__(**fedavg_options)
        if max_weight_ratio is not None and not max_weight_ratio >= 1.0:
            raise ValueError(f"max_weight_ratio must be >= 1 or None, got {max_weight_ratio}.")
        if max_weight_share is not None and not 0.0 < max_weight_share < 0.5:
            raise ValueError(f"max_weight_share must be in (0, 1/2) or None, "
                             f"got {max_weight_share}.")
        if flagged_receive not in ("own", "global"):
            raise ValueError(f"flagged_receive must be 'own' or 'global', "
                             f"got {flagged_receive!r}.")
        _check_rule(rule, dict(rule_options or {}))
        from ..lora import check_config

        check_config(lora_config)  # before the clients train, not in the first round
        self.flagged_receive = flagged_receive
        self.rule = rule
        self.lora_config = lora_config
        self.personalized = personalized
        self.rule_options = dict(rule_options or {})
        self.max_weight_ratio = max_weight_ratio
        self.max_weight_share = max_weight_share
        self.client_arrays_, self.flagged_, self.last_results_ = {}, {}, None
        self.dropped_, self.dropped_evaluate_, self.weights_ = {}, {}, {}
        self.flagged_history_, self.failed_ = {}, {}
        self._rule_failed_last = None  # the round whose rule failed, if the last to reach it

    def summary(self):
        """Log the rule, then FedAvg's settings."""
        from logging import INFO

        from flwr.supercore import log

        log(INFO, "\t├──> clairstat rule: %s (personalized=%s, flagged_receive=%s, "
            "max_weight_ratio=%s, max_weight_share=%s)", self.rule, self.personalized,
            self.flagged_receive, self.max_weight_ratio, self.max_weight_share)
        super().summary()

    def _personalize(self, messages):
        """Replace the shared arrays by each node's own adapter where one is stored."""
        if not self.personalized or not self.client_arrays_:
            return messages
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            content = message.content
            if node in self.client_arrays_:
                content = RecordDict({**dict(content.items()),
                                      self.arrayrecord_key: self.client_arrays_[node]})
            out.append(Message(content=content, dst_node_id=node,
                               message_type=message.metadata.message_type))
        return out

    def configure_train(self, server_round, arrays, config, grid):
        """FedAvg's training messages, personalized per node."""
        return self._personalize(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round, arrays, config, grid):
        """FedAvg's evaluation messages, personalized per node."""
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._personalize(messages)

    def _count(self, content, arrays=True):
        """The reply's example count: a finite positive number, else _MalformedReply."""
        expected = (("ArrayRecord", content.array_records),) if arrays else ()
        for kind, records in expected + (("MetricRecord", content.metric_records),):
            if len(records) != 1:
                raise _MalformedReply(f"expected exactly one {kind}, got {len(records)}")
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            raise _MalformedReply(f"no {self.weighted_by_key!r} in its MetricRecord")
        count = metrics[self.weighted_by_key]
        try:
            value = float(count)  # a list, or an int beyond float's range, fails here
        except (TypeError, ValueError, OverflowError):
            value = np.nan
        if not (np.isfinite(value) and value > 0):
            shown = f"{count!r}" if len(repr(count)) <= 40 else f"{repr(count)[:40]}..."
            raise _MalformedReply(f"{self.weighted_by_key} = {shown} is not a finite "
                                  "positive number")
        if not arrays:  # an evaluation reply is its metrics
            bad = _non_finite_metrics(content, self.weighted_by_key)
            if bad:
                raise _MalformedReply(f"metric(s) {bad} are not finite numbers")
        return value

    def _adapter(self, content):
        """The reply's adapter and its shape signature ``((module, (d_out, d_in)), ...)``
        (``(d_out, d_in, r)`` for the rules that need equal ranks), followed by
        ``(key, shape)`` of each tensor beside the LoRA pairs (the shape followed by
        ``"integer"`` or ``"bool"`` where the tensor is not floating point)."""
        try:
            state = arrays_to_state_dict(next(iter(content.array_records.values())))
        except (ValueError, TypeError, KeyError) as error:
            raise _MalformedReply(f"unreadable adapter: {error}") from error
        untested = untested_keys(state)
        for key, value in state.items():  # every tensor, the untested ones too
            if value.dtype.kind not in _REAL_KINDS:
                raise _MalformedReply(f"{key} has dtype {value.dtype}, not real numbers")
            # The outputs are written in the replies' dtypes: an integer or bool lora_A
            # in the first reply sent every client a global adapter rounded to
            # integers, uint8 wrapping -1 to 255 (a review).
            if key not in untested and value.dtype.kind != "f":
                raise _MalformedReply(f"{key} has dtype {value.dtype}: LoRA factors must "
                                      "be floating point")
        try:
            factors = adapter_factors(state)  # unscaled: rank 0 must not reach alpha / r
        except (ValueError, TypeError, KeyError) as error:
            raise _MalformedReply(f"unreadable adapter: {error}") from error
        for module, (b_mat, a_mat) in factors.items():
            if 0 in b_mat.shape + a_mat.shape:
                raise _MalformedReply(f"{module} has rank 0 or is empty: lora_B "
                                      f"{b_mat.shape}, lora_A {a_mat.shape}")
            if a_mat.shape[0] > min(b_mat.shape[0], a_mat.shape[1]):  # check_factors'
                raise _MalformedReply(f"{module} has rank {a_mat.shape[0]} above min(d_out, "
                                      f"d_in) = {min(b_mat.shape[0], a_mat.shape[1])}: "
                                      f"lora_B {b_mat.shape}, lora_A {a_mat.shape}")
            for name, matrix in (("lora_B", b_mat), ("lora_A", a_mat)):
                if not np.all(np.isfinite(matrix)):
                    raise _MalformedReply(f"{module}.{name} holds non-finite values")
            # |(B A)_ij| <= r max|B| max|A|: a bound that overflows could make B A inf.
            bound = a_mat.shape[0] * float(np.abs(b_mat).max()) * float(np.abs(a_mat).max())
            if not math.isfinite(bound):  # Python floats: inf, without a RuntimeWarning
                raise _MalformedReply(f"{module}: lora_B lora_A may overflow float64")
            # The rules' own bound (clairstat.aggregation.check_factors), on the factors
            # they receive: scale x lora_B exactly as aggregate_adapters computes it.
            scale = lora_scaling(self.lora_config, module, a_mat.shape[0])
            with np.errstate(over="ignore"):
                scaled = scale * b_mat
            try:
                _check_size(module, scaled, a_mat)
            except ValueError as error:  # B there is scale x lora_B
                raise _MalformedReply(str(error)) from None
        for key in untested:
            if not np.all(np.isfinite(state[key])):
                raise _MalformedReply(f"{key} holds non-finite values")
        signature = tuple(sorted((module, self._shape(b_mat, a_mat))
                                 for module, (b_mat, a_mat) in factors.items()))
        # The untested tensors' kinds too (an integer buffer such as a batch norm's
        # count is no float one): the global adapter writes their median in the
        # replies' dtype, and an integer head in the first reply rounded everyone's
        # (a review).
        return state, signature + tuple((key, _shape_and_kind(state[key]))
                                        for key in untested)

    def _shape(self, b_mat, a_mat):
        """``(d_out, d_in)``, and the rank for the rules that need equal ranks."""
        shape = (b_mat.shape[0], a_mat.shape[1])
        return shape + (a_mat.shape[0],) if self.rule in _EQUAL_RANK_RULES else shape

    def _min_replies(self):
        """The fewest valid replies the rule aggregates, and what needs them: 2, and
        ``max(2 n_byzantine + 3, multi)`` for krum (3 without ``n_byzantine``; krum
        raised on fewer replies than ``multi``, after the screen: a review)."""
        if self.rule == "krum":
            # (multi=None is refused at construction, as krum refuses it)
            f, multi = self.rule_options.get("n_byzantine"), self.rule_options.get("multi", 1)
            if multi > (3 if f is None else 2 * int(f) + 3):
                return multi, f"rule 'krum' with multi={multi}"
            if f is None:
                return 3, ("rule 'krum' (n_replies >= 2 n_byzantine + 3; n_byzantine, not "
                           "given, is derived from the reply count, 0 at the least)")
            return 2 * int(f) + 3, f"rule 'krum' with n_byzantine={f} (2 n_byzantine + 3)"
        return 2, "aggregation"

    def _screen(self, server_round, replies):
        """Node ids, adapters and counts of the well-formed replies; the others dropped."""
        read = []
        replies, dropped = _single_replies(replies)
        for message in replies:
            node = message.metadata.src_node_id
            try:
                count = self._count(message.content)
                read.append((message, node, count, *self._adapter(message.content)))
            except _MalformedReply as reason:
                dropped[node] = str(reason)
        if read:  # the shapes most replies share; on a tie, those of the smallest node id
            # (Counter's first seen followed the replies' arrival order: which nodes
            # were dropped changed with it; a review)
            counts = collections.Counter(item[-1] for item in read)
            lowest = {}
            for item in read:
                lowest[item[-1]] = min(lowest.get(item[-1], item[1]), item[1])
            common = max(counts, key=lambda shapes: (counts[shapes], -lowest[shapes]))
            for item in [item for item in read if item[-1] != common]:
                dropped[item[1]] = (f"modules and shapes {dict(item[-1])} differ from "
                                    f"those of most replies {dict(common)}")
            read = [item for item in read if item[-1] == common]
            if self.rule == "ffa":
                read = _same_frozen_a(read, dropped)
            read = _fit_output_dtypes(read, dropped)
        _log_dropped(server_round, "", dropped)
        self.dropped_[server_round] = dropped
        return read, dropped

    def _aggregate(self, adapters, weights):
        """Per-client adapters, the global adapter (numpy state dicts) and the flags.

        One path for every rule: the rule per module (:func:`aggregate_adapters`), each
        client's adapter from the results (:func:`personalized_state_dicts`: CLAIR's
        refined updates, or the global update at the client's rank) and the global
        adapter (:func:`global_state_dict`)."""
        options = dict(self.rule_options)
        rank = options.get("rank")
        if self.rule == "clair" and options.get("joint", True) \
                and isinstance(rank, (int, np.integer)) and not isinstance(rank, bool) \
                and rank > max(len(adapters) - 1, 0):
            # a round with fewer clients than the run was sized for (a reply dropped, a
            # node not sampled) cannot hold the joint rank: the round's largest, as the
            # joint refinement does for a collaborative set too small for it
            _LOGGER.warning("joint rank %d exceeds what this round's %d clients support; "
                            "using %d", rank, len(adapters), max(len(adapters) - 1, 0))
            options["rank"] = max(len(adapters) - 1, 0)
        with mixed_ranks_expected():  # one lora_config, clients of several ranks allowed
            results = aggregate_adapters(self.rule, adapters, self.lora_config, weights,
                                         **options)
            per_client, flagged = personalized_state_dicts(
                results, adapters, self.lora_config, flagged_receive=self.flagged_receive)
        # The first reply's keys and ranks, but each tensor's widest dtype among the
        # replies: a float16 first reply wrote every client's global adapter in float16,
        # a precision that depended on which reply came first (a review).
        template = {key: value.astype(np.result_type(*(adapter[key].dtype for adapter in
                                                       adapters if key in adapter)),
                                      copy=False)
                    for key, value in adapters[0].items()}
        global_adapter = _untested_median(global_state_dict(results, template,
                                                            self.lora_config), adapters)
        self.last_results_ = results  # once every output is written (see aggregate_train)
        return per_client, global_adapter, flagged

    def _metrics(self, messages, weights, aggregate_fn, server_round=None):
        """FedAvg's metric aggregation, weighted by the capped weights, over the replies
        whose metrics are finite numbers, with the metric names (and list lengths) most
        replies share; the others are logged and left out (all their metrics: FedAvg
        weights every metric by the same total) and their node ids returned.

        FedAvg checks that every reply holds the same metric names, a check this
        strategy turns off to drop replies one by one: a reply without ``accuracy``
        counted as an accuracy of 0 (5 replies of 0.8 and one without gave 0.67), and
        one list of another length lost every metric of the round (a review)."""
        layouts = [_metric_layout(message.content, self.weighted_by_key)
                   for message in messages]
        bads = [_non_finite_metrics(message.content, self.weighted_by_key)
                for message in messages]
        # The layout of most replies with finite metrics, ties to the larger total weight,
        # then to a fixed order: Counter's first-seen tie-break followed the replies'
        # arrival order (two replies of two layouts kept whichever came first, a review).
        tally = collections.defaultdict(lambda: [0, 0.0])
        for layout, weight, bad in zip(layouts, weights, bads):
            if not bad:
                tally[layout][0] += 1
                tally[layout][1] += float(weight)
        common = max(tally, key=lambda layout: (*tally[layout], repr(layout)), default=None)
        contents, left_out = [], []
        for message, weight, layout, bad in zip(messages, weights, layouts, bads):
            why = (f"metric(s) {bad} are not finite numbers" if bad else
                   None if layout == common else
                   f"its metrics {dict(layout)} differ from those of most replies "
                   f"{dict(common)} (name: list length, or None)")
            if why:
                node = message.metadata.src_node_id
                left_out.append(int(node))
                _LOGGER.warning("round %s: left the metrics of node %s out of the average: "
                                "%s", server_round, node, why)
                continue
            content = message.content
            key, record = next(iter(content.metric_records.items()))
            capped = MetricRecord({**dict(record.items()), self.weighted_by_key: float(weight)})
            contents.append(RecordDict({**dict(content.items()), key: capped}))
        if not contents:
            return MetricRecord(), left_out
        try:
            return aggregate_fn(contents, self.weighted_by_key), left_out
        except (ValueError, TypeError) as error:  # e.g. metric lists of unequal lengths
            _LOGGER.warning("the clients' metrics could not be aggregated: %s", error)
            return MetricRecord(), left_out

    def aggregate_train(self, server_round, replies):
        """Aggregate the well-formed replies' adapters with the clairstat rule.

        Malformed replies are dropped and reported (class Notes); the example counts
        are capped at ``max_weight_ratio`` times their median, and then so that no
        client holds more than ``max_weight_share`` of the weight.

        Returns
        -------
        arrays : ArrayRecord or None
            The global adapter (CLAIR: the collaborative mean, read out at the first
            valid client's rank); ``None`` when no reply carries content, or when fewer
            valid replies remain, after dropping the malformed ones, than the rule needs
            (class Notes), or when the rule fails on them (its message, clients named
            by node id, in ``failed_``): the round is then skipped, logged at WARNING,
            Flower keeps the previous global adapter and the nodes their previous
            personalized ones. A fixed CLAIR joint ``rank`` above what a round's clients
            support is lowered for that round (logged), not a failure.
        metrics : MetricRecord or None
            FedAvg's weighted metrics (capped weights) over the replies whose metrics
            are all finite numbers, ``n-dropped`` and ``dropped-nodes``, ``n-failed`` and
            ``failed-nodes`` (replies carrying a Flower error),
            ``metrics-left-out-nodes`` (the node ids whose metrics held a NaN or an
            infinite value, or other metric names or list lengths than most replies,
            left out of the average and logged; their adapters are aggregated), plus
            ``n-flagged`` and ``flagged-nodes`` for CLAIR. A skipped round's metrics are
            ``n-dropped``, ``dropped-nodes``, ``n-valid`` and ``skipped`` (1), and
            ``rule-failed`` (1) where the rule failed.

        Raises
        ------
        ValueError
            When the rule fails in this round and in the last round that reached it
            (rounds skipped for too few replies in between do not count): a failure
            that repeats is not one round's replies' (both messages, clients by node
            id).
        """
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        failed = _failures(errors)
        if not valid:
            return None, (MetricRecord({**failed, "n-dropped": 0, "dropped-nodes": [],
                                        "n-valid": 0, "skipped": 1}) if errors else None)
        read, dropped = self._screen(server_round, valid)
        needed, why = self._min_replies()
        extra = {"n-dropped": len(dropped), "dropped-nodes": [int(n) for n in dropped],
                 **failed}
        if len(read) < needed:
            # Skipped, as FedAvg skips a round without replies: raising here ended the
            # whole run (Flower's start does not catch it) when, say, one of two sampled
            # clients failed or sent a NaN adapter (a review).
            _LOGGER.warning("round %s: skipped, the global and personalized adapters stay "
                            "those of the previous round: %d valid replies after dropping "
                            "%d malformed ones (%s); %s needs at least %d", server_round,
                            len(read), len(dropped), dropped, why, needed)
            return None, MetricRecord({**extra, "n-valid": len(read), "skipped": 1})
        messages, nodes, counts, adapters, _ = (list(column) for column in zip(*read))
        weights = cap_weights(counts, self.max_weight_ratio, self.max_weight_share,
                              minority=self.rule in _MAJORITY_RULES)
        try:
            per_client, global_adapter, flagged = self._aggregate(adapters, weights)
        except ValueError as error:  # the rules name clients by position: give node ids
            # Skipped like a round with too few replies: raising ended the whole run
            # (Flower's start does not catch it) on a failure of one round's replies (a
            # review). A failure that repeats in the next round that reaches the rule
            # (rounds skipped for too few replies in between do not count) is not one
            # round's: it raises, so that a run does not end "successfully" with every
            # round skipped and its initial adapter (later reviews).
            message = (f"{error} (clients by position: node ids "
                       f"{[int(n) for n in nodes]})")
            before = getattr(self, "_rule_failed_last", None)  # a strategy pickled before
            if before is not None:
                raise ValueError(f"round {server_round}: rule {self.rule!r} failed in this "
                                 f"round and in the last round that reached it: {message} "
                                 f"(round {before}: {self.failed_[before]})") from error
            self.failed_[server_round] = message
            self._rule_failed_last = server_round
            _LOGGER.warning("round %s: skipped, the global and personalized adapters stay "
                            "those of the previous round: rule %r failed on the %d valid "
                            "replies: %s", server_round, self.rule, len(read), message)
            return None, MetricRecord({**extra, "n-valid": len(read), "skipped": 1,
                                       "rule-failed": 1})
        self._rule_failed_last = None
        # The round's state only once it has aggregated: a round that raised left the
        # next round's weights_ and last_results_ half updated.
        self.weights_ = dict(zip(nodes, (weights / weights.sum()).tolist()))
        self.client_arrays_ = {node: state_dict_to_arrays(sd)
                               for node, sd in zip(nodes, per_client)}
        self.flagged_ = ({} if flagged is None else
                         {node: bool(flag) for node, flag in zip(nodes, flagged)})
        if flagged is not None:
            self.flagged_history_[server_round] = dict(self.flagged_)
        metrics, left_out = self._metrics(messages, weights, self.train_metrics_aggr_fn,
                                          server_round)
        extra["metrics-left-out-nodes"] = left_out
        if flagged is not None:
            extra["n-flagged"] = int(np.sum(flagged))
            extra["flagged-nodes"] = [int(n) for n, f in zip(nodes, flagged) if f]
        return state_dict_to_arrays(global_adapter), MetricRecord({**dict(metrics.items()),
                                                                   **extra})

    def aggregate_evaluate(self, server_round, replies):
        """FedAvg's weighted evaluation metrics, robust to malformed replies.

        A reply without exactly one MetricRecord, with a missing, non-finite or
        non-positive count, or with a metric value (or list entry) that is not a finite
        number (a NaN accuracy made the round's accuracy NaN: a review) is dropped,
        logged and recorded in ``dropped_evaluate_``; the counts are capped as in
        training. A reply whose metric names (or list lengths) differ from those most
        replies share is left out of the average, logged and listed in
        ``metrics-left-out-nodes``. The metrics gain ``n-dropped``, ``dropped-nodes``,
        ``metrics-left-out-nodes``, ``n-failed`` and ``failed-nodes`` (replies carrying a
        Flower error); where no valid reply remains, ``None``, or those counts alone
        when some replies failed.
        """
        valid, errors = self._check_and_log_replies(replies, is_train=False, validate=False)
        kept, counts = [], []
        valid, dropped = _single_replies(valid)
        for message in valid:
            try:
                counts.append(self._count(message.content, arrays=False))
                kept.append(message)
            except _MalformedReply as reason:
                dropped[message.metadata.src_node_id] = str(reason)
        _log_dropped(server_round, "evaluation ", dropped)
        self.dropped_evaluate_[server_round] = dropped
        if not kept:  # nothing to average; the failures are still the round's to report
            return MetricRecord({"n-dropped": len(dropped),
                                 "dropped-nodes": [int(n) for n in dropped],
                                 **_failures(errors)}) if errors else None
        weights = cap_weights(counts, self.max_weight_ratio, self.max_weight_share)
        metrics, left_out = self._metrics(kept, weights, self.evaluate_metrics_aggr_fn,
                                          server_round)
        return MetricRecord({**dict(metrics.items()), "n-dropped": len(dropped),
                             "dropped-nodes": [int(n) for n in dropped],
                             "metrics-left-out-nodes": left_out, **_failures(errors)})


def _failures(errors):
    """``n-failed`` and ``failed-nodes`` of the replies that carry a Flower error (a
    client's exception, or an error the link reports: a message whose time to live ran
    out, a node that is gone): FedAvg only logs them, and a round's metrics did not say
    so (a review). A reply that never arrives within the round's timeout is no reply:
    the grid returns fewer, and it is not counted here."""
    return {"n-failed": len(errors),
            "failed-nodes": [int(message.metadata.src_node_id) for message in errors]}


def _single_replies(replies):
    """The replies of the nodes that replied once, and ``{node: reason}`` for the others.

    A node that replies more than once in a round: which reply is its own is unknown,
    and aggregating both gave it two shares (a review); all its replies are dropped, and
    it counts once in ``n-dropped`` (which counts nodes)."""
    sent = collections.Counter(message.metadata.src_node_id for message in replies)
    dropped = {node: f"{count} replies from this node in one round (one expected)"
               for node, count in sent.items() if count > 1}
    single = [message for message in replies if sent[message.metadata.src_node_id] == 1]
    return single, dropped


def _same_frozen_a(read, dropped):
    """The screened replies whose ``lora_A`` of every module is the one most replies share
    (FFA-LoRA freezes A: one reply with another A aborted the round, naming nobody, a
    review); the others are added to ``dropped``."""
    factors = [adapter_factors(item[3]) for item in read]
    odd = {}
    for module in factors[0] if factors else ():
        # compared after adapter_factors' cast to float64, as the rule then compares
        # them (aggregate_adapters): a reply sending the shared A in float16 is dropped
        # here, not let through to make the rule refuse the round (a review)
        for index in a_outliers([client[module][1] for client in factors]):
            odd.setdefault(index, module)
    for index, module in odd.items():
        dropped[read[index][1]] = (f"{module}.lora_A differs from the frozen A most replies "
                                   "share (rule 'ffa')")
    return [item for index, item in enumerate(read) if index not in odd]


def _fit_output_dtypes(read, dropped):
    """The screened replies whose values fit every dtype an output is written in; the
    others are added to ``dropped``.

    The global adapter takes each tensor's widest dtype among the replies, each
    personalized one those of its client: a tensor's values must fit the smallest
    floating dtype the replies give it (the largest finite number of float32 is 3.4e38:
    a float64 reply of 1e40 among float32 ones wrote inf into every client's adapter,
    a review)."""
    limits = {}
    for item in read:
        for key, value in item[3].items():
            if value.dtype.kind == "f":
                limit = float(np.finfo(value.dtype).max)
                if limit < limits.get(key, (math.inf,))[0]:
                    limits[key] = (limit, value.dtype)
    kept = []
    for item in read:
        for key, value in item[3].items():
            largest = max(float(value.max()), -float(value.min())) if value.size else 0.0
            if key in limits and largest > limits[key][0]:
                limit, dtype = limits[key]
                dropped[item[1]] = (f"{key} holds values up to {largest:.3g}, beyond the "
                                    f"largest {dtype} ({limit:.3g}), a dtype the outputs "
                                    "are written in")
                break
        else:
            kept.append(item)
    return kept


def _log_dropped(server_round, kind, dropped):
    """One WARNING per dropped reply, with the node id and the reason."""
    for node, reason in dropped.items():
        _LOGGER.warning("round %s: dropped the %sreply of node %s: %s", server_round, kind,
                        node, reason)
