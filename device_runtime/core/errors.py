"""The one exception type for bad user input.

Anything raised as `InputError` is a problem with what the user gave us (a file, a flag, a bundle). The
command lines print its message on one line and exit non-zero, without a traceback. Messages name the
file or value and say what is wrong with it.
"""


class InputError(ValueError):
    """Bad user input: a file that cannot be read, a bundle that does not verify, a bad flag value."""


def os_error_line(err: OSError) -> str:
    """One line for an OS error: the path(s) it names, then the reason ('No space left on device', ...)."""
    where = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    reason = err.strerror or str(err)
    return f"{where}: {reason}" if where else reason


def exit_code_of(action, prog: str) -> int:
    """Run `action()` and return its exit code (0 when it returns none).

    On InputError print "PROG: error: message" as one line on stderr and return 2; on an OS error (read-only,
    not a folder, no space, permission) the same with the path and the reason, return 1; on Ctrl-C return 130.
    The command lines wrap their work in this so that bad input never shows a traceback.
    """
    import sys

    try:
        code = action()
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the last net under every path of every command; writers are atomic, so nothing is half-written
        print(f"{prog}: error: {os_error_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0
