"""Evaluation: lm-eval on our checkpoints (`lm_backend`, `runner`), the shipped offline task suite
(`tasks/`), the code sandbox for code-generation tasks, evaluation during training and plots.

Heavy imports (lm_eval, torch) happen inside the modules that need them, never here.
"""
