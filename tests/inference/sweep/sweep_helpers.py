"""Shared pieces of the sweep tests: tiny budgets, and the columns that hold timings."""

# Budgets small enough for a task to take about a second; the numbers are poor, and that is fine:
# these tests check that the sweep runs, stores and resumes, not how good the methods are.
TINY = {
    "svi_options": {"num_steps": 60},
    "nuts_options": {"num_samples": 40, "num_warmup": 40, "num_chains": 2},
    "reference_options": {"num_samples": 60, "num_warmup": 60, "num_chains": 2},
    "num_draws": 50,
}

# Columns that differ between two runs of the same task: clocks, where and when it ran.
TIMING_COLUMNS = ["finished_at", "task_seconds", "wall_time", "ess_per_second", "host", "node_id", "node_ip"]


def numbers(frame):
    """A results frame without its timing columns, indexed by task id, for equality checks."""
    return frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame]).set_index("task_id").sort_index()
