"""CLI subcommands beyond train/prepare/compile-check, one module per pipeline step.

Each module defines `register(sub)` which adds its argparse subparser(s) and sets `func` on them.
`register` imports only argparse-level things; the handler imports the heavy modules (JAX,
transformers, lm-eval) when it runs, so `imitation-jax --help` stays fast. `cli.build_parser`
discovers the modules here in name order, so adding a step never edits a shared file.
"""
