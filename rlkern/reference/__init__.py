"""PyTorch references of every rlkern op: float64-capable, any device; the oracle of the tests."""
