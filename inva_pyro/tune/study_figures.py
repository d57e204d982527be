"""Optuna's own matplotlib figures of a study, saved as PNG: the history and the importances.

The importances need at least two complete trials whose settings differ; before that (or when
every trial so far was pruned) the figure is left out and the reason printed, since a study in
its first minutes is not an error.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..data.io import atomic_write_bytes

FIGURES = {"history.png": "plot_optimization_history", "importances.png": "plot_param_importances"}


def write_figures(study: optuna.Study, out_dir: Path, report=print) -> list[str]:
    """Each figure that the study's trials allow; returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written = []
    for name, function in FIGURES.items():
        if function == "plot_param_importances" and len(complete) < 2:
            report(f"{name}: left out (parameter importances need at least 2 complete trials)")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = getattr(plots, function)(study)
            except (RuntimeError, ValueError) as exc:  # e.g. every complete trial has the same settings
                report(f"{name}: left out ({' '.join(str(exc).split())})")
                continue
        figure = axes.figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        atomic_write_bytes(Path(out_dir) / name, buffer.getvalue())
        written.append(name)
    return written
