"""Training callbacks: online k-NN monitor, collapse monitor, run report.

Each callback only orchestrates: the science lives in the pure-PyTorch bricks
(:mod:`protogmm.evaluation`, :mod:`protogmm.diagnostics`).

Long-tailed training data (classes in at least two of the many / medium / few groups of
:meth:`protogmm.training.datamodule.SSLDataModule.frequency_groups`): the k-NN monitor also
measures the untrained encoder's and raw pixels' per-group accuracy at the start, and the
run report adds per-group k-NN and linear accuracy and per-group prototype diversity
(:mod:`protogmm.evaluation.longtail`). Every run writes ``class_counts.json`` and reports
the image files skipped as unreadable (``data.images.on_bad=skip``).

Each callback lives in its own module (:mod:`~protogmm.training.knn_monitor`,
:mod:`~protogmm.training.collapse_monitor`, :mod:`~protogmm.training.run_report`; the
per-group evaluation they share in :mod:`~protogmm.training.longtail_eval`); this module
gathers them under the name the runner, the CLI and the tests have always imported them by.
"""

from protogmm.training.collapse_monitor import (
    DENSE_REFERENCE_K,
    TRAINING_EPS,
    CollapseMonitor,
    eps_key,
)
from protogmm.training.knn_monitor import KNNMonitor, log
from protogmm.training.longtail_eval import (
    LONGTAIL_LINEAR_EPOCHS,
    evaluating,
    long_tailed_data,
    pixels_long_tail,
    teacher_long_tail,
)
from protogmm.training.run_report import (
    MAX_LISTED_FILES,
    RunReport,
    data_log,
    peak_memory_mb,
    render_report,
    skipped_images,
    write_text_atomically,
)

__all__ = [
    "DENSE_REFERENCE_K",
    "LONGTAIL_LINEAR_EPOCHS",
    "MAX_LISTED_FILES",
    "TRAINING_EPS",
    "CollapseMonitor",
    "KNNMonitor",
    "RunReport",
    "data_log",
    "eps_key",
    "evaluating",
    "log",
    "long_tailed_data",
    "peak_memory_mb",
    "pixels_long_tail",
    "render_report",
    "skipped_images",
    "teacher_long_tail",
    "write_text_atomically",
]
