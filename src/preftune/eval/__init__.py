"""Evaluating trained models: win rate and reward against a reference, sweeps, the HTML report.

Named `eval` rather than `evaluate` so it never shadows the `preftune.evaluate` function."""
