"""Copying experiment swept over the number of clients and the contaminated share.

The design of :mod:`simulations.studies.copying` (both settings, the same model, tasks
and methods) at 8, 16 and 32 clients with 0 %, 10 %, 25 % and 40 % of them
contaminated (rounded: 0/1/2/3, 0/2/4/6 and 0/3/8/13 clients; the attacks cycle
through random targets, reversed copies, a backdoor and a flipped, scaled update). Each
point reports CLAIR's gain over local LoRA, its margins over the other rules and its
detection by kind of client. Its own seed block (``seed_block = "sweep"``).

The robust rules keep the copying study's settings (:mod:`simulations.copying.methods`),
whatever the contaminated share: the trimmed mean cuts 0.1 per tail (at 8 clients 0.8 of
a client: it warns that it cuts no client whole, and at every share above 10 % it cuts
less than the attackers' share), Krum assumes ``f = (n_clients - 3) // 2`` attackers
(2 at 8 clients: the 3 attackers of the 40 % point exceed any f that Krum admits
there, ``n_clients >= 2 f + 3``).
"""

from __future__ import annotations

from .._framework import Study
from .copying import SETTINGS, TINY, simulate_one

__all__ = ["STUDY", "SHARES", "CLIENTS"]

SHARES = (0.0, 0.1, 0.25, 0.4)
CLIENTS = (8, 16, 32)


def _cells(n_clients_values, shares, **overrides):
    from simulations.copying.replicate import DEFAULT_PARAMS

    return [dict(DEFAULT_PARAMS, **overrides, setting=setting, n_variants=n_variants,
                 n_clients=n_clients, n_contaminated=int(round(share * n_clients)),
                 contaminated_share=share, seed_block="sweep")
            for n_clients in n_clients_values for share in shares
            for setting, n_variants in SETTINGS.items()]


STUDY = Study(
    name="copying_sweep",
    description="copying experiment over 8-32 clients and 0-40 % contaminated: CLAIR's "
                "gain, margins and detection per design point",
    grids={"smoke": _cells((6,), (0.0, 0.34), **{k: v for k, v in TINY.items()
                                                 if k not in ("n_clients",
                                                              "n_contaminated")}),
           "small": _cells(CLIENTS, SHARES),
           "full": _cells(CLIENTS, SHARES)},
    replicates={"smoke": 1, "small": 3, "full": 20},
    simulate_one=simulate_one)
