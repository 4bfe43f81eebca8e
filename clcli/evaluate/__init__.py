"""Evaluation of frozen representations: weighted k-nearest-neighbour vote and linear probe."""
