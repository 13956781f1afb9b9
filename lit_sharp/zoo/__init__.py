"""Pretrained model zoos: sources, evaluation sets and the zoo run (the paper's Section 4)."""
