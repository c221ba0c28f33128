"""The argument parser of ``deqir-fast``: one-line usage errors, every option's default in
its help, notes for options given twice, and subcommands whose options are added only once
the subcommand is chosen (each command module's ``add_arguments``).

Only the standard library at module level, so that ``deqir-fast --version`` and ``--help``
do not wait seconds for torch: a subcommand's options take their choices and defaults from
modules that import it, and its command module is imported when it is chosen."""
from __future__ import annotations

import argparse
import importlib
from typing import Dict

from .. import __version__
from .options import _finite_floats

class _GivenStore(argparse._StoreAction):
    """argparse's store, recording which options the command line gave (a default is not
    a choice the user made, so it gets no note) and refusing a second value where the
    first would be dropped without a word: an error for ``--task`` (which image problem
    is solved), a note for the rest (scripts override a default given earlier)."""

    REFUSED_TWICE = ("task",)

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_given", None)
        if given is None:
            given = {}
            setattr(namespace, "_given", given)
        text = ",".join(map(str, values)) if isinstance(values, list) else str(values)
        if self.dest in given:
            first = given[self.dest]
            if self.dest in self.REFUSED_TWICE:
                raise argparse.ArgumentError(self, f"given twice ({first}, then {text}); "
                                                   f"give it once")
            notes = getattr(namespace, "_notes", None) or []
            notes.append(f"{option_string} given twice ({first}, then {text}): using {text}")
            setattr(namespace, "_notes", notes)
        given[self.dest] = text
        super().__call__(parser, namespace, values, option_string)


def given_options(args) -> Dict[str, str]:
    """dest -> text of the options given on the command line (not defaulted)."""
    return getattr(args, "_given", None) or {}


class _LazySubParsers(argparse._SubParsersAction):
    """Subcommands whose options are added once the subcommand is chosen (``builders``):
    they import torch, which the top level's --version and --help need not wait for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.builders = {}

    def __call__(self, parser, namespace, values, option_string=None):
        self.build(values[0])
        super().__call__(parser, namespace, values, option_string)

    def build(self, name: str) -> None:
        builder = self.builders.pop(name, None)
        if builder is not None:
            builder(self._name_parser_map[name])

    def build_all(self) -> None:
        for name in list(self.builders):
            self.build(name)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the default prints the whole usage first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, _GivenStore)
        self.register("action", "store", _GivenStore)
        self.register("action", "parsers", _LazySubParsers)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends every option's default."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or not action.option_strings
                or any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            return text
        return f"{text} (default: %(default)s)"


DESCRIPTION = """\
Restore images with a diffusion model (DDRM or DDNM), solving the whole sampling chain
as one parallel fixed-point system (DeqIR) or step by step. Without --model, the bundled
1.1M-parameter UNet (32x32 coloured digits) is used."""

EXAMPLES = """\
examples:
  deqir-fast demo                                   # bundled images: serial vs parallel
  deqir-fast restore low.png --task sr4 --out high.png
  deqir-fast restore photo.png --task inpaint_box --simulate --resize --crop
  deqir-fast restore scans/ --task deblur_gauss --out restored/
  deqir-fast restore 'frames/*.png' --task denoise --mode parallel --window 10 --out out/
  deqir-fast info"""


# The subcommands: what --help says of each; their options are their modules' add_arguments.
SUBCOMMANDS = {
    "restore": dict(help="restore images (files, folders or glob patterns)",
                    description=DESCRIPTION, epilog=EXAMPLES),
    "demo": dict(help="restore bundled held-out images serially and in parallel; print a "
                      "table, save demo.png and convergence.png",
                 description="Restore bundled held-out images (coloured digits) with the "
                             "bundled model, serially and in parallel, for several tasks; "
                             "print rounds, model evaluations, times, PSNR/SSIM against "
                             "the truth and a baseline; save demo.png and convergence.png."),
    "info": dict(help="versions, devices and kernel backends",
                 description="Print the versions of deqir-fast and its dependencies, the "
                             "devices torch sees and the kernel backends each would use."),
    "bench": dict(help="benchmark serial against parallel sampling: tables, JSON, plots"),
}


def _add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Subcommand ``name``'s options, from its module (deqir_fast/cli/NAME.py)."""
    importlib.import_module(f".{name}", __package__).add_arguments(parser)
    _finite_floats(parser)


def build_parser(lazy: bool = False) -> argparse.ArgumentParser:
    """The whole parser; ``lazy``: each subcommand's options are added only when it is
    parsed (what ``main`` uses, so that --version and --help import nothing heavy)."""
    p = _Parser(prog="deqir-fast", description=DESCRIPTION, epilog=EXAMPLES,
                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"deqir-fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, kwargs in SUBCOMMANDS.items():
        parser = sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)
        sub.builders[name] = lambda parser, name=name: _add_arguments(name, parser)
    if not lazy:
        sub.build_all()
    return p


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Checks that span several options (one option's own checks are its type's), reported
    as the subcommand's usage errors."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub._name_parser_map[args.command]
    if getattr(args, "quiet", False) and getattr(args, "verbose", False):
        command.error("--quiet and --verbose contradict each other (--quiet hides notes and "
                      "progress, --verbose adds tracebacks); give one")
    if getattr(args, "out", None) == "":
        # Path("") is the current folder: an empty --out would write there unasked.
        what = ("an output file (e.g. restored.png) or a folder ending in /"
                if args.command == "restore" else "a folder")
        command.error(f"argument --out: is empty; name {what}")
