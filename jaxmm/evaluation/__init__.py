"""Evaluation: the split evaluator shared with training (``scoring``), metrics, calibration,
the reports of ``jaxmm.evaluate`` (``report``) and explanations."""
