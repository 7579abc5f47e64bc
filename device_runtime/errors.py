"""The one exception type for bad user input.

Anything raised as `InputError` is a problem with what the user gave us (a file, a flag, a bundle). The
command lines print its message on one line and exit non-zero, without a traceback. Messages name the
file or value and say what is wrong with it.
"""


class InputError(ValueError):
    """Bad user input: a file that cannot be read, a bundle that does not verify, a bad flag value."""
