"""Tests for lit_sharp.top1 and lit_sharp.evaluation.ClassificationError: one rule for what counts as an error."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassAccuracy

from lit_sharp.evaluation import ClassificationError
from lit_sharp.top1 import batch_error, misclassified


def _batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in (7, 13, 1):
        # few distinct values, so that some rows hold ties for the top logit
        logits = torch.randint(0, 3, (size, 10), generator=generator).float()
        batches.append((logits, torch.randint(0, 10, (size,), generator=generator)))
    return batches


def test_the_metric_counts_the_mistakes_torchmetrics_accuracy_counts() -> None:
    ours, accuracy = ClassificationError(), MulticlassAccuracy(num_classes=10, average="micro")
    for logits, labels in _batches():
        ours.update(logits, labels)
        accuracy.update(logits, labels)
    wrong, seen = ours.counts()
    assert (wrong, seen) == (int(accuracy.fn.sum()), int((accuracy.tp + accuracy.fn).sum()))
    assert seen == 21 and 0 < wrong < seen
    error = ours.compute()
    assert error.dtype == torch.float64 and error.item() == wrong / seen


def test_the_metric_and_the_batch_error_count_the_same_mistakes() -> None:
    for logits, labels in _batches(seed=1):
        metric = ClassificationError()
        metric.update(logits, labels)
        wrong, seen = metric.counts()
        assert wrong == int(misclassified(logits, labels).sum()) and seen == len(labels)
        error = batch_error(logits, labels)
        assert error.dtype == torch.float32
        assert torch.equal(error, (logits.argmax(dim=1) != labels).float().mean())


def test_soft_labels_count_as_their_most_likely_class() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 3.0, 1.0]])
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.6, 0.0, 0.4], [0.1, 0.8, 0.1]])
    assert misclassified(logits, soft).tolist() == [False, True, False]
    assert torch.equal(batch_error(logits, soft), batch_error(logits, soft.argmax(dim=1)))


def test_the_metric_adds_nothing_to_a_checkpoint() -> None:
    metric = ClassificationError()
    metric.update(*_batches()[0])
    assert metric.state_dict() == {}
