"""What the two command lines, `nerveseg` and `nerveseg-device`, share: the parser (one-line errors), the help
format (every default shown), --version and the exit codes printed under --help.

One module, so that both tools read alike: the same "COMMAND" listing, the same "(default: ...)" tails, the
same exit-code table (device_runtime.core.errors defines the codes).
"""

from __future__ import annotations

import argparse
from typing import Callable

from .. import __version__
from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK


def exit_codes(refusals: bool) -> str:
    """The exit-status table of --help; `refusals`: the tool has artifacts a check may refuse (code 3)."""
    lines = ["exit status:",
             f"  {EXIT_OK:<4} every requested artifact was written",
             f"  {EXIT_FAILED:<4} an operating-system error (disk full, permission, read-only folder) or an "
             "unexpected fault",
             f"  {EXIT_BAD_INPUT:<4} bad input (a flag, a file, a bundle, a run folder): one line names it"]
    if refusals:
        lines += [f"  {EXIT_INCOMPLETE:<4} the command ran, but an artifact it asked for was refused by its own check "
                  "and not written",
                  "       (an INT8 bundle whose every INT8 file the parity gate refused); the last line says which;",
                  "       what was written stands"]
    lines.append(f"  {EXIT_INTERRUPTED:<4} interrupted (Ctrl-C); files are written atomically, none is left "
                 "half-written")
    return "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus its noise: no "(default: None)" for a flag whose absence means "the
    recipe's value" or "off" (its help says so), none where the help already names its default; descriptions and
    epilogs keep their line breaks (tables)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        if isinstance(action.default, (list, tuple)):
            return f"{text} (default: {' '.join(map(str, action.default))})"
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the whole usage first) and whose help shows
    defaults; the subcommands `top_parser`'s add_command makes are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def top_parser(prog: str, description: str, refusals: bool) -> tuple[Parser, Callable[..., Parser]]:
    """The tool's parser (--version, the exit codes under its help) and `add_command(name, summary,
    description=None)`, which adds a subcommand: `summary` in the tool's COMMAND list, `description` (default: the
    summary) atop its own --help, the same exit codes below it. `refusals` as for exit_codes."""
    epilog = exit_codes(refusals)
    parser = Parser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser,
                                     title="commands (COMMAND --help for each)")

    def add_command(name: str, summary: str, description: str | None = None) -> Parser:
        return commands.add_parser(name, help=summary, epilog=epilog,
                                   description=description or summary[0].upper() + summary[1:] + ".")

    return parser, add_command
