"""Collecting preference data: sample completions, score them with a reward, build pairs."""
