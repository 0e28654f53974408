"""Trainer-facing compositions of rlkern ops, one module per family (configs, trainer names)."""
