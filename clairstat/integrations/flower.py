"""A Flower strategy that aggregates LoRA adapters with any clairstat rule, CLAIR included.

Clients send their peft adapter (``get_peft_model_state_dict``) as an ``ArrayRecord``
with a ``MetricRecord`` holding their example count. The server maps the adapters to
per-module updates, runs the rule (:func:`clairstat.lora.aggregate_adapters`, or
:func:`clairstat.lora.refine_adapters` for ``"clair"``) and returns the global adapter.
With ``personalized=True`` every client receives, in the next round's messages (train
and evaluate), its own adapter: for CLAIR its refined one (a flagged client gets its own
adapter back), for the other rules the global update read out at that client's rank.

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

import numpy as np

try:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("clairstat.integrations.flower needs Flower: "
                      "pip install clairstat[flower,lora]") from error

from ..lora import aggregate_adapters, global_state_dict, refine_adapters

__all__ = ["LoraStrategy", "arrays_to_state_dict", "state_dict_to_arrays"]


def arrays_to_state_dict(record):
    """An ``ArrayRecord`` as a dict of numpy arrays (Flower loads them with
    ``np.load(allow_pickle=False)``: no pickle is ever read)."""
    return {key: array.numpy() for key, array in record.items()}


def state_dict_to_arrays(state_dict):
    """A dict of numpy arrays or torch tensors as an ``ArrayRecord``."""
    arrays = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        arrays[key] = Array(np.ascontiguousarray(value))
    return ArrayRecord(arrays)


class LoraStrategy(FedAvg):
    """FedAvg's message flow with a clairstat aggregation rule on LoRA adapters.

    Parameters
    ----------
    rule : str, default="clair"
        ``"clair"`` or any rule of :func:`clairstat.aggregation.aggregate`.
    lora_config : peft.LoraConfig or dict, optional
        The clients' LoRA config (gives the scaling ``lora_alpha / r``); ``None`` takes
        the factors as they are.
    personalized : bool, default=True
        Send each client its own adapter (refined by CLAIR, or the global update at its
        rank) instead of one global adapter for all. Needed when ranks differ.
    rule_options : dict, optional
        Options of the rule (for ``"clair"``: ``joint`` and the parameters of
        :class:`clairstat.CLAIREstimator`).
    **fedavg_options
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``min_available_nodes``, ``weighted_by_key``, ...).

    Attributes
    ----------
    client_arrays_ : dict of int to ArrayRecord
        The adapter each node receives next (personalized mode).
    flagged_ : dict of int to bool
        CLAIR's flags of the last round, by node id (empty for other rules).
    last_results_ : LoraRefinement or dict of str to AggregationResult
        The last round's clairstat output.
    """

    def __init__(self, rule="clair", lora_config=None, personalized=True,
                 rule_options=None, **fedavg_options):
        super().__init__(**fedavg_options)
        self.rule = rule
        self.lora_config = lora_config
        self.personalized = personalized
        self.rule_options = dict(rule_options or {})
        self.client_arrays_, self.flagged_, self.last_results_ = {}, {}, None

    def summary(self):
        """Log the rule, then FedAvg's settings."""
        from logging import INFO

        from flwr.supercore import log

        log(INFO, "\t├──> clairstat rule: %s (personalized=%s)", self.rule,
            self.personalized)
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

    def _collect(self, replies):
        """Node ids, adapters (numpy state dicts) and weights of the valid replies."""
        nodes, adapters, weights = [], [], []
        for message in replies:
            content = message.content
            nodes.append(message.metadata.src_node_id)
            adapters.append(arrays_to_state_dict(next(iter(content.array_records.values()))))
            metrics = next(iter(content.metric_records.values()))
            weights.append(float(metrics[self.weighted_by_key]))
        return nodes, adapters, np.asarray(weights)

    def _aggregate(self, adapters, weights):
        """Per-client adapters and the global adapter (numpy state dicts)."""
        if self.rule == "clair":
            options = dict(self.rule_options)
            joint = options.pop("joint", False)
            refinement = refine_adapters(adapters, self.lora_config, joint=joint,
                                         sample_weight=weights, **options)
            self.last_results_ = refinement
            mean = refinement.mean_state_dict(adapters[0], self.lora_config)
            return refinement.state_dicts, mean, refinement.flagged
        results = aggregate_adapters(self.rule, adapters, self.lora_config, weights,
                                     **self.rule_options)
        self.last_results_ = results
        per_client = [global_state_dict(results, adapter, self.lora_config)
                      for adapter in adapters]
        return per_client, global_state_dict(results, adapters[0], self.lora_config), None

    def aggregate_train(self, server_round, replies):
        """Aggregate the replies' adapters with the clairstat rule.

        Returns
        -------
        arrays : ArrayRecord or None
            The global adapter (CLAIR: the collaborative mean, read out at the first
            client's rank).
        metrics : MetricRecord or None
            FedAvg's weighted metrics plus ``n-flagged`` for CLAIR.
        """
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        nodes, adapters, weights = self._collect(valid)
        per_client, global_adapter, flagged = self._aggregate(adapters, weights)
        self.client_arrays_ = {node: state_dict_to_arrays(sd)
                               for node, sd in zip(nodes, per_client)}
        self.flagged_ = ({} if flagged is None else
                         {node: bool(flag) for node, flag in zip(nodes, flagged)})
        metrics = self.train_metrics_aggr_fn([m.content for m in valid],
                                             self.weighted_by_key)
        if flagged is not None:
            metrics = MetricRecord({**dict(metrics.items()),
                                    "n-flagged": int(np.sum(flagged))})
        return state_dict_to_arrays(global_adapter), metrics
