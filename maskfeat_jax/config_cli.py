"""The command line around a config: a config file's argument (``--config=FILE:ARG``,
``parse_arg``), a config file naming one setting of another (``from_file``), ``--config`` found
from any folder (``resolve_config_file``) and ``flags_parser``, which turns flag and config errors
into one line; ``run`` and ``command_flags`` make any ``python -m`` command of the package an absl
program whose ``main`` tests can also call with a list of flags. The config itself is ``config``.
"""
from __future__ import annotations

import difflib
import os
import re

import ml_collections


def parse_arg(arg: str | None, variants, switches=("ft", "runlocal")) -> tuple[str, set[str]]:
    """A config file's argument (``--config=FILE:ARG``) as ``(variant, switches)``.

    ``ARG`` is ``VARIANT[,SWITCH...]``: the first of ``variants`` (the default without an
    argument), then any of ``switches``, comma separated (``L/16,ft,runlocal``). Anything else
    is a ``ValueError`` naming what the file takes."""
    variant, *rest = [a.strip() for a in (arg or variants[0]).split(",")]
    if variant not in variants or not set(rest) <= set(switches):
        raise ValueError(f"config argument {arg!r}: expected VARIANT[,SWITCH...] with VARIANT one of "
                         f"{', '.join(variants)} and SWITCH one of {', '.join(switches)}")
    return variant, set(rest)


def from_file(anchor: str, spec: str) -> ml_collections.ConfigDict:
    """``get_config(ARG)`` of the config file ``FILE`` for ``spec = "FILE:ARG"``, ``FILE``
    relative to the folder of ``anchor`` (a config file's ``__file__``): a config file that
    names one setting of another, e.g. ``configs/vit_l_in1k.py`` for ``vit_in1k.py:L/16``."""
    import importlib.util
    name, _, arg = spec.partition(":")
    path = os.path.join(os.path.dirname(os.path.abspath(anchor)), name)
    module_spec = importlib.util.spec_from_file_location(f"_config_{os.path.splitext(name)[0]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')
_MISSING = re.compile(r"^\W*'([^'\\]+)\\?'")


def unknown_override_message(error: Exception, argv) -> str | None:
    """One line for ml_collections' error about an unknown ``--config.<key>`` override: the
    whole key, and ml_collections' own closest name put in its place (``unknown config key
    config.optim.base_rl; did you mean optim.base_lr?``). None when ``error`` is another error."""
    if not isinstance(error, (AttributeError, KeyError)):
        return None
    text = str(error)
    m = _DID_YOU_MEAN.search(text)
    missing = m.group(2) if m else (_MISSING.match(text) or [None, None])[1]
    overrides = [a.lstrip("-").split("=", 1)[0][len("config."):] for a in argv
                 if a.lstrip("-").startswith("config.")]
    for key in overrides:
        parts = key.split(".")
        if missing in parts:
            message = f"unknown config key config.{key}"
            if m:
                i = parts.index(missing)
                message += f"; did you mean {'.'.join(parts[:i] + [m.group(1)] + parts[i + 1:])}?"
            return message
    return None


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # holds configs/ in a clone


def resolve_config_file(spec: str) -> str:
    """``--config=FILE[:arg]`` as given when FILE exists, else FILE relative to the repository
    this package was installed from (``configs/demo.py`` works from any folder). A missing file
    is a ``ValueError`` naming it and the closest files in ``configs/``."""
    path, sep, arg = spec.partition(":")
    if os.path.isfile(path):
        return spec
    in_repo = os.path.join(REPO, path)
    if not os.path.isabs(path) and os.path.isfile(in_repo):
        return in_repo + sep + arg
    known = sorted(f"configs/{f}" for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")) \
        if os.path.isdir(os.path.join(REPO, "configs")) else []
    close = difflib.get_close_matches(path.replace(os.sep, "/").split("/")[-1], [k[8:] for k in known], n=3)
    hint = f"; did you mean {' or '.join('configs/' + c for c in close)}?" if close else \
        (f"; the configs are {', '.join(known)}" if known else "")
    where = "" if os.path.isabs(path) else f" (looked in {os.getcwd()} and {REPO})"
    raise ValueError(f"--config={path}: no such file{where}{hint}")


def _one_line(error: Exception) -> str:
    """``error``'s message; ml_collections puts a config file's own traceback into its message,
    of which the flag and the last line (the file's error) are kept."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and "Error whilst parsing config file" in lines[0]:
        return f"{lines[0].split(': Error whilst', 1)[0]}: {lines[-1]}"
    return str(error)


HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def flags_parser(flag_values):
    """An ``absl.app.run(..., flags_parser=)`` for a command with a ``--config`` file flag:
    ``--config`` is found from any folder (``resolve_config_file``); a missing config file, a
    config file's own error, an unknown ``--config.<key>`` override (named, with ml_collections'
    closest key: ``unknown_override_message``) or any other flag error is one line on stderr and
    exit code 2 instead of a traceback; ``--help`` (or ``-h``) exits 0."""
    import sys

    def parse(argv):
        argv = ["--help" if a == "-h" else a for a in argv]
        try:
            argv = [f"--config={resolve_config_file(a[len('--config='):])}" if a.startswith("--config=") else a
                    for a in argv]
            try:
                rest = flag_values(argv)
            except SystemExit as e:      # absl's --help prints the usage and exits 1
                if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv):
                    sys.exit(0)
                raise
            if "config" in flag_values and flag_values["config"].value is not None:
                getattr(flag_values["config"].value, "keys")   # a file that failed to load raises here
            return rest
        except Exception as e:  # noqa: BLE001 - ml_collections raises several types here
            print(f"error: {unknown_override_message(e, argv) or _one_line(e)}", file=sys.stderr)
            sys.exit(2)

    return parse


def command_flags(define, argv, name: str):
    """The flags a command's ``main(argv)`` reads. Under ``absl.app.run`` (``argv[0]`` is the
    program) they are absl's global flags, parsed already. Called with a list of flags instead
    (``main(["--csv=x.csv"])``, as the tests do), those are parsed into flags of their own
    (``define(FlagValues)``), leaving the global ones alone; a flag error exits 2 with one line,
    as on the command line."""
    from absl import flags
    if argv and not argv[0].startswith("-"):
        return flags.FLAGS
    flag_values = define(flags.FlagValues())
    flags_parser(flag_values)([name, *argv])
    return flag_values


def run(main, define, *, exit_code: bool = True) -> None:
    """Runs ``main`` as an absl program with the flags ``define(FLAGS)`` defines (errors as in
    ``flags_parser``). ``main``'s return value is the exit status where ``exit_code``, else
    ignored (a command that returns what it wrote exits 0)."""
    from absl import app, flags

    def status(argv):
        result = main(argv)
        return result if exit_code else None

    app.run(status, flags_parser=flags_parser(define(flags.FLAGS)))
