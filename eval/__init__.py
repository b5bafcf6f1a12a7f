"""Evaluation: perplexity, forecasting against baselines, sampling and FLOPs (not written yet)."""
