"""Reading the results store into tidy tables, memory-limit estimates, flat exports and plots."""
from analysis.export import export_curves, export_runs
from analysis.limits import DEFAULT_THRESHOLD, capacity_table, markdown_table, memory_limits
from analysis.results import load_curves, load_runs

_PLOTS = ("plot_capacity", "plot_curves", "plot_setting2", "plot_recall", "model_palette")

__all__ = ["load_runs", "load_curves", "memory_limits", "capacity_table", "markdown_table",
           "DEFAULT_THRESHOLD", "export_runs", "export_curves", *_PLOTS]


def __getattr__(name):
    # The plots pull in seaborn and matplotlib (seconds to import); load them on first use so
    # `import analysis` stays cheap for the command line and the store's users.
    if name in _PLOTS:
        from analysis import plots
        return getattr(plots, name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
