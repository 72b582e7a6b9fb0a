"""The project's own user-error types.

A ``UserError`` means the input, the config or the environment is wrong, never that jaxmm has a
bug: its message is one line that names the file, folder or config key and says what to do. The
entry points print such errors as one line; every other exception keeps its traceback.
"""


class UserError(Exception):
    """Base of every error that the command-line entry points print as one line."""


class PrepareError(UserError, ValueError):
    """Bad raw data, prepare options or prepared-dataset location."""


class TokenizerError(UserError, OSError):
    """A tokenizer that cannot be loaded; the message says what to do."""


class PretrainedNotFoundError(UserError, FileNotFoundError):
    """A pretrained source is neither a local path nor a cached hub id."""


class PretrainedFormatError(UserError, ValueError):
    """A pretrained checkpoint in a format jaxmm refuses or cannot read."""


class HubUnreachableError(UserError, ConnectionError):
    """The Hugging Face hub cannot be reached (no network on this machine)."""


class ConfigError(UserError, ValueError):
    """A config value, flag or command-line argument that cannot work; names the key."""


class WorkdirError(UserError, FileNotFoundError):
    """A workdir, its run record, checkpoint or prepared dataset is missing or does not fit."""


class DivergedError(UserError, FloatingPointError):
    """The loss or the gradient norm became NaN or infinite: the run diverged."""


class BundleError(UserError, ValueError):
    """An export bundle that cannot be used: a missing, unreadable or mismatched file (named)."""
