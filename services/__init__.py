"""tiermesh tiers: one package per tier, each run with `python -m services.<tier>`."""
