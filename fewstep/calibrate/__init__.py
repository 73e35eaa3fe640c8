"""Offline calibration of samplers: searches that produce artifacts (DC-Solver ratios and CPR fits)."""
