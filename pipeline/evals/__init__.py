"""Evaluation of an in-memory model: strided perplexity, the lm-eval bridge, the packed fast scorer
and its metrics, and the offline lm-eval tasks (`tasks/`). `evaluate.Evaluator` is the entry point."""
