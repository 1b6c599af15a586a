"""A toy study for the framework tests (importable as ``simulation_toy:STUDY``)."""

import os
import time

import numpy as np

from simulations import Study, grid


def simulate_one(params, seed):
    """Draw one N(mu, 1) value; ``delay`` seconds of sleep make runs interruptible."""
    time.sleep(params.get("delay", 0.0))
    rng = np.random.default_rng(seed)
    return {"value": float(rng.normal(params["mu"])), "solver": "none", "pid": os.getpid()}


def simulate_global(params, seed):
    """Seed a process-wide generator, then draw from it after a pause (as the copying
    studies seed torch's global generator with ``torch.manual_seed``)."""
    np.random.seed(seed)
    time.sleep(0.01 * (seed % 3))
    return {"value": float(np.random.normal(params["mu"]))}


def make_study(delay=0.0, replicates=4):
    """The toy study with a given per-replicate delay and replicate count."""
    cells = grid(mu=[0.0, 1.0, 2.0], delay=delay)
    return Study(name="toy", description="framework test study",
                 grids={scale: cells for scale in ("smoke", "small", "full")},
                 replicates={scale: replicates for scale in ("smoke", "small", "full")},
                 simulate_one=simulate_one)


STUDY = make_study()
SLOW_STUDY = make_study(delay=0.3, replicates=10)
GLOBAL_STUDY = Study(name="toy_global", description="framework test study",
                     grids={scale: grid(mu=[0.0, 1.0, 2.0, 3.0])
                            for scale in ("smoke", "small", "full")},
                     replicates={scale: 3 for scale in ("smoke", "small", "full")},
                     simulate_one=simulate_global)


def simulate_threads(params, seed):
    """Report the torch threads the replicate ran on (a value that differs between one
    and two threads, as torch's sums do in their last bits)."""
    import torch

    return {"value": float(torch.get_num_threads()) + params["mu"]}


THREADS_STUDY = Study(name="toy_threads", description="framework test study",
                      grids={scale: grid(mu=[0.0, 1.0]) for scale in ("smoke", "small", "full")},
                      replicates={scale: 1 for scale in ("smoke", "small", "full")},
                      simulate_one=simulate_threads)
