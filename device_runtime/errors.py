"""The one exception type for bad user input.

Anything raised as `InputError` is a problem with what the user gave us (a file, a flag, a bundle). The
command lines print its message on one line and exit non-zero, without a traceback. Messages name the
file or value and say what is wrong with it.
"""


class InputError(ValueError):
    """Bad user input: a file that cannot be read, a bundle that does not verify, a bad flag value."""


def exit_code_of(action, prog: str) -> int:
    """Run `action()` and return its exit code (0 when it returns none).

    On InputError print "PROG: error: message" as one line on stderr and return 2; on Ctrl-C return 130.
    The command lines wrap their work in this so that bad input never shows a traceback.
    """
    import sys

    try:
        code = action()
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0
