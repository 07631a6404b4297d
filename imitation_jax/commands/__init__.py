"""CLI subcommands, one module per pipeline step (the table is `imitation_jax.cli.COMMANDS`).

Each module defines `register(sub)` which adds its argparse subparser(s) and sets `func` on them.
`register` imports only argparse-level things; the handler imports the heavy modules (JAX,
transformers, lm-eval) when it runs, so `imitation-jax --help` stays fast.
"""

EXIT_USER_ERROR = 2  # a user mistake: one line on stderr, no traceback


def add_model_arguments(p) -> None:
    """MODEL, --step and --dtype, as every command that runs a model through
    `imitation_jax.convert.loading.load_model` takes them."""
    p.add_argument("model", metavar="MODEL", help="run dir, import-hf params dir, or Hugging Face model dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run dir (default: the newest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter and compute dtype (default: as saved)")
