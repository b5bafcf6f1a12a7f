"""Evaluation: perplexity, sampling from scratch, forecasting against baselines, exact match, FLOPs."""
