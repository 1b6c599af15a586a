"""Monte Carlo studies of the claims of the method, one study per claim.

Run one with ``python -m simulations STUDY --scale smoke|small|full``; see
``simulations/README.md`` for the interface a study implements.
"""

from ._framework import (SCALES, RunError, Study, cell_id, default_results_dir, derive_seed,
                         grid, load_results, load_table, pending_tasks, read_rows,
                         results_path, run_study, verify_table)
from ._controls import CONTROLS, Control, control_results_dir, get_control
from .studies import available_studies, get_study

__all__ = ["SCALES", "RunError", "Study", "cell_id", "default_results_dir", "derive_seed",
           "grid", "load_results", "load_table", "pending_tasks", "read_rows", "results_path",
           "run_study", "verify_table", "available_studies", "get_study", "CONTROLS", "Control",
           "control_results_dir", "get_control"]
