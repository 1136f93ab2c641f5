"""Bayesian inference for zinc homeostasis models (numpyro)."""
