"""citadeld: the orchestration daemon of the Citadel AI cluster."""

__version__ = "0.1.0"
