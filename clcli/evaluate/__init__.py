"""Evaluation of frozen representations: one loader (:mod:`.loader`), one extraction path (:mod:`.features`),
one result writer (:mod:`.results`); weighted kNN, the linear probe, retrieval, zero-shot and online kNN, and
features saved to a file (:mod:`.embed`)."""
