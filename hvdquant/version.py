"""hvdquant's version. Part of every first-step agreement: payload formats and checkpoints may
change between versions (0.4.0: checkpoints of earlier versions do not load)."""

__version__ = "0.4.0"
