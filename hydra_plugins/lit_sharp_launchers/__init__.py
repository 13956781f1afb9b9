"""lit_sharp's grid launchers (:mod:`lit_sharp.launchers`), defined here because Hydra loads launchers only from the
``hydra_plugins`` package. ``hydra/launcher=local``, ``slurm`` and ``slurm_local`` select them."""

from lit_sharp import launchers


class JoblibLauncher(launchers.JoblibLauncher):
    """See :class:`lit_sharp.launchers.JoblibLauncher`."""


class SlurmLauncher(launchers.SlurmLauncher):
    """See :class:`lit_sharp.launchers.SlurmLauncher`."""


class LocalLauncher(launchers.LocalLauncher):
    """See :class:`lit_sharp.launchers.LocalLauncher`."""
