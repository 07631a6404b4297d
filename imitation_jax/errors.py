"""The exception types that mean "the user gave us something wrong" (the CLI prints them as one
line); anything else is our bug and keeps its traceback."""

from imitation_jax.checkpoint import CheckpointError
from imitation_jax.config import ConfigError
from imitation_jax.data.formats import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError)
