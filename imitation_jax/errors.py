"""The exception types that mean "the user gave us something wrong" (the CLI prints them as one
line); anything else is our bug and keeps its traceback. The bottom layer: imports nothing of ours."""


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line."""


class DataError(ValueError):
    """Bad training data or a bad tokenizer path; the message is one line naming where and why.

    `kind` names the class of problem ("invalid_json", "bad_role", "truncated_file", ...): with
    --skip-invalid, skipped records are counted by kind in stats.json.
    """

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(" ".join(message.split("\n")))
        self.kind = kind


class CheckpointError(ValueError):
    """A missing or unusable checkpoint; the message is one line."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError)
