"""Per-group (head / medium / tail) evaluation of a run: the teacher and the raw pixels.

Long-tailed training data (classes in at least two of the many / medium / few groups of
:meth:`protogmm.training.datamodule.SSLDataModule.frequency_groups`) get per-group k-NN and
linear accuracy and per-group prototype diversity (:mod:`protogmm.evaluation.longtail`):
measured for the untrained encoder and raw pixels by the k-NN monitor before the first
step, for the trained teacher by the run report, and by ``protogmm diagnose``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch

from protogmm.evaluation import evaluate_long_tail, prototype_diversity

#: Linear-probe epochs of the per-group analysis (as ``protogmm eval linear``).
LONGTAIL_LINEAR_EPOCHS = 100


def long_tailed_data(datamodule: Any) -> bool:
    """Whether the run's data module splits its training classes into >= 2 frequency groups."""
    return datamodule is not None and bool(getattr(datamodule, "is_long_tailed", lambda: False)())


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics) and no gradients, then the previous mode."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def teacher_long_tail(
    module: L.LightningModule,
    datamodule: Any,
    *,
    with_prototypes: bool = True,
    linear_epochs: int = LONGTAIL_LINEAR_EPOCHS,
) -> dict[str, Any]:
    """Per-group k-NN / linear accuracy of the teacher backbone and prototype diversity.

    A sample's prototype is the argmax of the teacher's cosine scores of its embedding
    (backbone, projection head, then the teacher's prototypes: the GMM means when
    decoupled), the assignment the training targets are built from: embedded with the
    teacher's BatchNorm layers on batch statistics, as in training (the accuracies use the
    running statistics, as evaluation does; :mod:`protogmm.evaluation.features`). The
    diversity is left out when ``with_prototypes`` is False or a mixture is not fitted yet.
    """
    train_loader, test_loader = datamodule.knn_dataloaders()
    groups = datamodule.frequency_groups()
    with evaluating(module):
        result = evaluate_long_tail(
            groups,
            train_loader,
            test_loader,
            module.teacher["backbone"],
            device=module.device,
            linear_epochs=linear_epochs,
        )
        if with_prototypes and module.prototypes_fitted():
            result["prototypes"] = teacher_prototype_diversity(module, datamodule)
    return result


def teacher_prototype_diversity(module: L.LightningModule, datamodule: Any) -> dict[str, Any]:
    """Distinct prototypes the training images of each frequency group are assigned to.

    A sample's prototype is the argmax of the teacher's cosine scores of its embedding,
    embedded with the teacher's BatchNorm layers on batch statistics as in training
    (:func:`~protogmm.evaluation.prototype_diversity` gives the measures).
    """
    train_loader, _ = datamodule.knn_dataloaders()
    with evaluating(module):
        embeddings, labels = module.teacher_embeddings(train_loader)
        prototypes = module.teacher_prototype_set()
        assignments = torch.cat(
            [
                prototypes(chunk.to(module.device)).argmax(dim=1).cpu()
                for chunk in embeddings.split(1024)
            ]
        )
    return prototype_diversity(assignments, labels, datamodule.frequency_groups())


def pixels_long_tail(
    datamodule: Any, linear_epochs: int = LONGTAIL_LINEAR_EPOCHS
) -> dict[str, Any]:
    """Per-group k-NN / linear accuracy of raw pixels (the baseline every number stands by)."""
    train_loader, test_loader = datamodule.knn_dataloaders()
    return evaluate_long_tail(
        datamodule.frequency_groups(),
        train_loader,
        test_loader,
        None,
        linear_epochs=linear_epochs,
    )
