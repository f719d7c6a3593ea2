"""Held-out evaluation outputs: sample grids, curves and the run summary."""
