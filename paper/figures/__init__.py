"""One figure script per study; each defines ``main(results_dir, out_dir) -> list[Path]``."""
