"""Pretrained ImageNet model zoos (paper Section 4): model sources, downloads, evaluation sets and training subsets.

Importing the package loads nothing heavy; import the submodules (``sources``, ``download``, ``eval_sets``,
``train_subsets``) where they are needed.
"""
