"""Evaluation of generated talking-face clips against ground truth: the paper's Table 1 (section 4).

``evaluation.metrics`` (the metrics), ``evaluation.networks`` (their feature networks, loaded from local
paths), ``evaluation.expression`` (E-FID's expression coefficients), ``evaluation.evaluate`` (the per-clip and
aggregated table behind ``synchrorama evaluate``). See docs/evaluation.md.
"""
