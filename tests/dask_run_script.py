"""Run the toy study on a local Dask cluster through ``python -m simulations``.

A ``LocalCluster(processes=True)`` needs a script with a ``__main__`` guard (its nannies
spawn fresh interpreters that re-import the main module), so the test runs this file in
a subprocess: ``python dask_run_script.py RESULTS_DIR``.
"""

import os
import sys

from distributed import Client, LocalCluster

from simulations.__main__ import main

if __name__ == "__main__":
    results_dir = sys.argv[1]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        status = main(["simulation_toy:STUDY", "--scale", "smoke", "--backend", "dask",
                       "--scheduler", cluster.scheduler_address, "--results-dir",
                       results_dir, "--no-progress"])
        # Which processes could run replicates: the workers' pids, not this one.
        with Client(cluster) as client:
            pids = sorted(client.run(os.getpid).values())
        print("MAIN_PID", os.getpid())
        print("WORKER_PIDS", " ".join(map(str, pids)))
    sys.exit(status)
