"""rlkern's benchmark suite, installed as ``rlkern.benches``; ``rlkern bench`` runs it."""
