"""Evaluation: ranking metrics, the classic HPO phenotype-similarity baseline, reports and plots."""
