"""CIFAR-10 data: the DataModule, the readers, and the writer of small synthetic data sets."""


def __getattr__(name: str):
    # Lazy, so `python -m lit_sharp.data.synthetic` and the pure-torch libraries do not import Lightning.
    if name == "CIFAR10DataModule":
        from lit_sharp.data.datamodule import CIFAR10DataModule

        return CIFAR10DataModule
    raise AttributeError(name)


__all__ = ["CIFAR10DataModule"]
