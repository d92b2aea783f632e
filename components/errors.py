"""One error type for bad input: the CLI prints its message as a single line instead of a traceback."""


class M1Error(Exception):
    """A problem with the user's input (path, config key, model architecture...), stated in one line."""
