"""rlkern's public operations: validation, autograd, layout and dispatch for each op family."""
