"""Offline jobs over an engine: quality, calibration, trade-off sweeps, predictor training and
evaluation. Each is a function returning a result dataclass; the CLI prints them."""
