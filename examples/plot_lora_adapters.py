"""
LoRA adapters in, refined adapters out
======================================

Twelve clients fine-tune the same base model with LoRA (rank 4 on two modules); their
updates share a two-dimensional column space per module, except for two adversarial
clients. The adapters are saved the way peft saves them (``save_pretrained``), read
back, refined with :func:`clairstat.lora.refine_adapters`, and the refined adapters are
loaded into peft models again. The same adapters are then aggregated with other rules of
:mod:`clairstat.aggregation` for comparison.

The adapters here are drawn, not trained, so that we know the clients' true updates and
can measure how far each adapter is from its own.
"""

# %%
# A base model and a LoRA configuration
# -------------------------------------
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import peft
import torch

from clairstat.lora import (adapter_factors, aggregate_adapters, global_state_dict,
                            load_adapter, refine_adapters)

D, RANK, N_CLIENTS, ADVERSARIES = 32, 4, 12, (3, 8)


class Base(torch.nn.Module):
    """Stands for a transformer block: two projections LoRA adapts."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(D, D, bias=False)
        self.v_proj = torch.nn.Linear(D, D, bias=False)


config = peft.LoraConfig(r=RANK, lora_alpha=8, target_modules=["q_proj", "v_proj"])
scale = config.lora_alpha / config.r  # peft's scaling of B A

# %%
# The clients' adapters, saved as peft saves them
# -----------------------------------------------
# Client k's true update of a module is ``scale * U G_k A_k`` (U: the module's shared
# D x 2 column space); its adapter adds estimation noise to ``B_k``. The adversaries'
# ``B_k`` point anywhere.
rng = np.random.default_rng(0)
shared = {name: np.linalg.qr(rng.standard_normal((D, 2)))[0] for name in ("q_proj", "v_proj")}
workdir = Path(tempfile.mkdtemp())
truth = []  # per client: module -> true dense update
for k in range(N_CLIENTS):
    model = peft.get_peft_model(Base(), config)
    state, true_updates = {}, {}
    for name, basis in shared.items():
        a_mat = rng.standard_normal((RANK, D)) / np.sqrt(D)
        b_true = basis @ rng.standard_normal((2, RANK))
        b_mat = b_true + 0.05 * rng.standard_normal((D, RANK))
        if k in ADVERSARIES:
            b_mat = 2.0 * rng.standard_normal((D, RANK))
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"] = torch.tensor(a_mat, dtype=torch.float32)
        state[f"{prefix}.lora_B.weight"] = torch.tensor(b_mat, dtype=torch.float32)
        true_updates[prefix] = scale * b_true @ a_mat
    peft.set_peft_model_state_dict(model, state)
    model.save_pretrained(workdir / f"client_{k:02d}")
    truth.append(true_updates)
print(sorted(p.name for p in (workdir / "client_00").iterdir()))

# %%
# Adapters in: read them back and refine
# --------------------------------------
# :func:`~clairstat.lora.load_adapter` reads safetensors only (never a pickle). CLAIR
# fits and tests every module; a client is flagged when it is flagged in more modules
# than a clean client would be (a binomial count at the tests' level: with two modules,
# both). By default the collaborative clients' whole adapters are then refined together,
# at a rank chosen by cross-validation across modules; ``joint=False`` refines each
# module by its own fit.
states = [load_adapter(workdir / f"client_{k:02d}" / "adapter_model.safetensors")
          for k in range(N_CLIENTS)]
refinement = refine_adapters(states, config, random_state=0)
print("flagged:", np.flatnonzero(refinement.flagged), " adversaries:", ADVERSARIES)
for module, flags in refinement.module_flagged.items():
    print(f"  {module}: {np.flatnonzero(flags)}")
print("joint rank chosen by cross-validation:", refinement.rank_selection.rank)
per_module = refine_adapters(states, config, random_state=0, joint=False)

# %%
# Adapters out: load the refined adapters into peft models
# --------------------------------------------------------
# ``refinement.state_dicts`` keep each client's keys, dtypes and rank, so peft loads
# them as they are; ``save_pretrained`` writes them for the clients.
for k, refined_state in enumerate(refinement.state_dicts):
    model = peft.get_peft_model(Base(), config)
    result = peft.set_peft_model_state_dict(model, refined_state)
    assert not result.unexpected_keys
    model.save_pretrained(workdir / "refined" / f"client_{k:02d}")
print(len(list((workdir / "refined").iterdir())), "refined adapters written")

# %%
# The same from the command line
# ------------------------------
# ``clairstat refine`` (also ``python -m clairstat refine``) does the above on adapter
# folders: one refined folder per client under ``--out``, and ``report.json`` with every
# client's flag and per-module p-values.
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

folders = [f"client_{k:02d}" for k in range(N_CLIENTS)]
command = [sys.executable, "-m", "clairstat", "refine", "--random-state", "0",
           "--out", "cli_out", *folders]
done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=True)
print(done.stdout)
report = json.loads((workdir / "cli_out" / "report.json").read_text())
print("flagged by the command:", [c["name"] for c in report["clients"] if c["flagged"]])

# %%
# How far is each adapter from the client's true update?
# ------------------------------------------------------
# Relative Frobenius error of every benign client's update, summed over modules, for its
# own adapter, the CLAIR-refined ones, and the global adapter of three other rules read
# out at rank 4. The clients' true updates differ (they share a subspace, not a
# value), so one global adapter, however robust, is far from each of them. Refined
# module by module (``joint=False``), CLAIR keeps each client's own component in the
# module's shared subspace and pools only the rest. The default joint refinement looks
# for a subspace shared across modules, its rank cross-validated by predicting one
# module's update from another's: here each module's coefficients are drawn
# independently, one module says nothing about the other, and the rank it chooses
# (printed above) is read off noise. Whatever that rank, the joint refinement pools
# along directions the clients do not share, and its error is far above each client's
# own adapter's (printed below); the rank alone does not tell, a comparison with
# ``joint=False`` on each client's held-out data does. Which of the two fits depends on
# whether the clients' differences repeat across modules (the copying experiment's,
# where the joint refinement gains more: ``docs/method_notes.md``, section 9).


def relative_error(state, k):
    """||Delta W - truth||_F / ||truth||_F over both modules of client k."""
    factors = adapter_factors(state, config)
    diff = sum(np.linalg.norm(b @ a - truth[k][m]) ** 2 for m, (b, a) in factors.items())
    norm = sum(np.linalg.norm(t) ** 2 for t in truth[k].values())
    return float(np.sqrt(diff / norm))


benign = [k for k in range(N_CLIENTS) if k not in ADVERSARIES]
errors = {"own adapter": [relative_error(states[k], k) for k in benign],
          "CLAIR per module": [relative_error(per_module.state_dicts[k], k) for k in benign],
          "CLAIR joint": [relative_error(refinement.state_dicts[k], k) for k in benign]}
for rule in ("fedit", "median", "krum"):
    results = aggregate_adapters(rule, states, config)
    errors[rule] = [relative_error(global_state_dict(results, states[k], config), k)
                    for k in benign]
for name, values in errors.items():
    print(f"{name:16s} median relative error {np.median(values):.3f}")

fig, ax = plt.subplots(figsize=(6.5, 3.2))
ax.boxplot(list(errors.values()), tick_labels=list(errors), orientation="horizontal")
ax.set(xscale="log", xlabel="relative error of a benign client's update (log scale)",
       title="Benign clients: distance to their true update")
fig.tight_layout()
