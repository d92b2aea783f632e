"""Evaluation: math benchmarks (pass@1, pass@k, maj@k), accuracy under a time budget, generation speed."""
