"""The one exception type for bad user input, and the exit codes of both command lines.

Anything raised as `InputError` is a problem with what the user gave us (a file, a flag, a bundle). The
command lines print its message on one line and exit non-zero, without a traceback. Messages name the
file or value and say what is wrong with it.
"""

# What the exit status of `nerveseg` and `nerveseg-device` says (cli_help.exit_codes prints it under --help):
# a script can tell "all written" from "ran, but an artifact it asked for was refused" from "bad input".
EXIT_OK = 0  # every requested artifact was written
EXIT_FAILED = 1  # an operating-system error (disk full, permission, read-only folder) or an unexpected fault
EXIT_BAD_INPUT = 2  # bad input: a flag, a file, a bundle or a run folder; nothing was started or written
EXIT_INCOMPLETE = 3  # the command ran, but a requested artifact was refused by its check and not written
EXIT_INTERRUPTED = 130  # Ctrl-C


class InputError(ValueError):
    """Bad user input: a file that cannot be read, a bundle that does not verify, a bad flag value."""


class RefusedError(InputError):
    """A requested artifact that its own check refused (an INT8 bundle whose every INT8 file the parity gate
    refused): the input was fine, the result did not pass. The command lines exit with EXIT_INCOMPLETE for it,
    not EXIT_BAD_INPUT."""


def os_error_line(err: OSError) -> str:
    """One line for an OS error: the path(s) it names, then the reason ('No space left on device', ...)."""
    where = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    reason = err.strerror or str(err)
    return f"{where}: {reason}" if where else reason


def exit_code_of(action, prog: str) -> int:
    """Run `action()` and return its exit code (0 when it returns none).

    On InputError print "PROG: error: message" as one line on stderr and return 2 (3 for a RefusedError); on an
    OS error (read-only, not a folder, no space, permission) the same with the path and the reason, return 1; on
    Ctrl-C return 130.
    The command lines wrap their work in this so that bad input never shows a traceback.
    """
    import sys

    try:
        code = action()
    except RefusedError as err:
        print(f"{prog}: refused: {err}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # the last net under every path of every command; writers are atomic, so nothing is half-written
        print(f"{prog}: error: {os_error_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else EXIT_OK
