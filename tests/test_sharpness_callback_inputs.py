"""``AdaptiveSharpness`` on any classifier: dict batches, forwards that take more than a tensor, other losses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lit_sharp.callbacks import AdaptiveSharpness
from lit_sharp.sharpness import SharpnessSpec, sharpness
from test_sharpness_callback import TinyClassifier, _data, _manual_batches

WORST = SharpnessSpec("worst", "l2", 0.05, n_iters=3)
AVERAGE = SharpnessSpec("average", "linf", 0.05, n_samples=3)
N_TOKENS, LENGTH, N_CLASSES = 11, 6, 3


class Texts(Dataset):
    """Token sequences padded with 0, their mask and a label, as a dict per example (as text pipelines yield)."""

    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(1, LENGTH + 1, (n,), generator=generator)
        tokens = torch.randint(1, N_TOKENS, (n, LENGTH), generator=generator)
        self.tokens = tokens * (torch.arange(LENGTH) < lengths[:, None])
        self.labels = torch.randint(0, N_CLASSES, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = self.tokens[index]
        return {"tokens": tokens, "mask": (tokens != 0).float(), "label": self.labels[index]}


class TextClassifier(pl.LightningModule):
    """Mean of masked token embeddings, then a linear head; ``forward`` takes a dict or two tensors."""

    def __init__(self, dict_forward: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(N_TOKENS, 8)
        self.head = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, N_CLASSES))
        self.dict_forward = dict_forward

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        inputs = args[0] if self.dict_forward else dict(zip(("tokens", "mask"), args), **kwargs)
        mask = inputs["mask"][..., None]  # (batch, length, 1)
        pooled = (self.embedding(inputs["tokens"]) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.head(pooled)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs = {"tokens": batch["tokens"], "mask": batch["mask"]}
        logits = self(inputs) if self.dict_forward else self(**inputs)
        return F.cross_entropy(logits, batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class FromTokens(nn.Module):
    """The reference: the classifier as a model of one tensor, the mask rebuilt from the padding."""

    def __init__(self, classifier: TextClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs = {"tokens": tokens, "mask": (tokens != 0).float()}
        return self.classifier(inputs) if self.classifier.dict_forward else self.classifier(**inputs)


def _text_inputs(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return {"tokens": batch["tokens"], "mask": batch["mask"]}, batch["label"]


def _trainer(callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


@pytest.mark.parametrize(
    ("dict_forward", "forward_fn"),
    [(True, None), (False, lambda model, inputs: model(**inputs))],
    ids=["forward-takes-a-dict", "forward-takes-two-tensors"],
)
def test_text_batches_are_measured_like_the_equivalent_tensor_model(
    dict_forward: bool, forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None
) -> None:
    torch.manual_seed(0)
    module, texts = TextClassifier(dict_forward), Texts(20)
    callback = AdaptiveSharpness([WORST, AVERAGE], dataloader=DataLoader(texts, batch_size=5), n_examples=14,
                                 batch_size=4, batch_transform=_text_inputs, forward_fn=forward_fn)  # fmt: skip
    _trainer([callback]).fit(module, DataLoader(texts, batch_size=5, shuffle=True))

    batches = list(zip(texts.tokens[:14].split(4), texts.labels[:14].split(4)))  # 4, 4, 4, 2
    for spec in (WORST, AVERAGE):
        expected = sharpness(FromTokens(module), batches, spec)
        assert callback.results[f"sharpness/{spec.name}"] == pytest.approx(expected.value, rel=1e-6)
        assert callback.results[f"sharpness_err_increase/{spec.name}"] == pytest.approx(expected.err_increase, abs=1e-9)
    assert callback.results[f"sharpness/{WORST.name}"] > 0


def _one_hot_mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(logits.softmax(dim=-1), F.one_hot(y, logits.shape[-1]).float())


def test_a_custom_loss_is_what_is_perturbed() -> None:
    torch.manual_seed(0)
    module, dataset = TinyClassifier("layer"), _data(32)
    callback = AdaptiveSharpness([WORST, AVERAGE], dataloader=DataLoader(dataset, batch_size=8), n_examples=24,
                                 batch_size=8, loss_fn=_one_hot_mse)  # fmt: skip
    _trainer([callback]).fit(module, DataLoader(dataset, batch_size=8))
    batches = _manual_batches(dataset, 24, 8)
    for spec in (WORST, AVERAGE):
        expected = sharpness(module, batches, spec, loss_fn=_one_hot_mse).value
        assert callback.results[f"sharpness/{spec.name}"] == pytest.approx(expected, rel=1e-6)
        assert expected != pytest.approx(sharpness(module, batches, spec).value, rel=1e-3)  # not cross-entropy



def test_a_loss_linear_in_the_weights_gives_the_closed_form() -> None:
    # For a loss linear in w, worst-case linf adaptive sharpness is rho * sum_i |g_i| |w_i| (g the gradient):
    # -logit of the target class of a bias-free linear model is such a loss.
    torch.manual_seed(0)
    model, dataset, rho = nn.Sequential(nn.Flatten(), nn.Linear(48, 5, bias=False)), _data(16), 0.01
    target_logit_loss = lambda logits, y: -logits.gather(1, y[:, None]).mean()  # noqa: E731
    callback = AdaptiveSharpness([SharpnessSpec("worst", "linf", rho)], dataloader=DataLoader(dataset, batch_size=16),
                                 n_examples=16, batch_size=16, loss_fn=target_logit_loss)  # fmt: skip
    value = callback.measure(model, progress=False)[f"sharpness/worst_linf_adaptive_rho{rho:g}"]
    x, y = dataset.tensors
    weight = model[1].weight
    (gradient,) = torch.autograd.grad(target_logit_loss(model(x), y), weight)
    assert value == pytest.approx(rho * (gradient.abs() * weight.abs()).sum().item(), rel=1e-5)


def test_forward_fn_is_used_on_tensor_inputs_too() -> None:
    torch.manual_seed(0)
    module, dataset = TinyClassifier("batch"), _data(24)
    tempered = AdaptiveSharpness([WORST], dataloader=DataLoader(dataset, batch_size=8), n_examples=24, batch_size=8,
                                 forward_fn=lambda model, x: model(x) / 2)  # fmt: skip
    tempered.measure(module, progress=False)

    class Halved(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) / 2

    expected = sharpness(Halved(), _manual_batches(dataset, 24, 8), WORST).value
    assert tempered.results[f"sharpness/{WORST.name}"] == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(sharpness(module, _manual_batches(dataset, 24, 8), WORST).value, rel=1e-3)


def test_a_dict_batch_without_batch_transform_fails_before_training_naming_its_keys() -> None:
    module, texts = TextClassifier(True), Texts(10)
    callback = AdaptiveSharpness([WORST], dataloader=DataLoader(texts, batch_size=5))
    with pytest.raises(ValueError, match=r"batch 0 is a dict with keys \['tokens', 'mask', 'label'\]; pass batch_tr"):
        _trainer([callback]).fit(module, DataLoader(texts, batch_size=5))
    assert module.global_step == 0


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (None, r"batch 0 is a list of 3 items \(Tensor, Tensor, Tensor\), not \(inputs, targets\); pass batch_transf"),
        (lambda batch: batch[0], r"batch_transform returned a Tensor for batch 0; it must return \(inputs, targets\)"),
        (lambda batch: (batch[0], batch[1].tolist()), r"returned a tuple of 2 items \(Tensor, list\) for batch 0"),
        (lambda batch: ((batch[0], batch[1][:2]), batch[2]), r"batch 0 have batch sizes \[4, 2\] but its targets 4"),
        (lambda batch: ("text", batch[2]), r"batch 0 hold no tensor: got a str"),
    ],
)
def test_batches_that_do_not_fit_are_named(transform: Callable[[Any], Any] | None, message: str) -> None:
    triples = TensorDataset(torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 2, (8,)))
    callback = AdaptiveSharpness([WORST], dataloader=DataLoader(triples, batch_size=4), batch_transform=transform)
    with pytest.raises(ValueError, match=message):
        callback.measure(nn.Linear(3, 2), progress=False)
