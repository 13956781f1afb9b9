"""Pretrained ImageNet model zoos (paper Section 4): where their files come from, how they are fetched and loaded.

Importing the package loads nothing heavy; import the submodules (``sources``, ``download``) where they are needed.
"""
