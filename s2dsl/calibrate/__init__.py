"""S-HPLB calibration: per-head recovery curves from a model's attention, and budgets.

``capture`` recomputes attention chunk by chunk and sums it into blocks; ``curves`` turns
block masses into recovery curves; ``budgets`` chooses per-head budgets (target, then
max-min at a fixed total) and measures heterogeneity and stability; ``emit`` writes the
budgets as a .s2 model plan; ``run.calibrate`` ties them together for a transformers model.
"""
from .run import Calibration, CalibrationError, calibrate, write_outputs

__all__ = ["Calibration", "CalibrationError", "calibrate", "write_outputs"]
