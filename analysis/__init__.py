"""Reading the results store into tidy tables, memory-limit estimates and plots."""
from analysis.results import load_curves, load_runs

__all__ = ["load_runs", "load_curves"]
