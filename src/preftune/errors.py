"""The one exception type users see.

A `PreftuneError` is a mistake the user can fix (bad file, bad key, model that will not load).
The CLI prints its message as one line on stderr and exits non-zero, without a traceback unless
`--debug` is given. Messages name the file, line and field where there is one.
"""


import difflib
from typing import Sequence


def suggest(name: str, known: Sequence[str]) -> str:
    """` (did you mean 'X'?)` for the closest of `known` names, or nothing: every error about a
    misspelt key, field, loss or reward ends with it."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class PreftuneError(Exception):
    """A user-facing error: its message is the whole story, printed on one line.

    Example::

        try:
            preftune.train({"learning_rat": 1e-4})
        except preftune.PreftuneError as exc:
            print(exc)  # config: unknown key 'learning_rat' (did you mean 'learning_rate'?)
    """


class Problems(PreftuneError):
    """Several independent problems found at once (a run's settings checked before it starts):
    one line each in the message, `problems` as a list. Fixing a config then takes one rerun,
    not one per mistake. The CLI prints each line as its own error line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class Interrupted(PreftuneError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint: exit like an interrupted program."""

    exit_code = 130


class MissingExtra(PreftuneError):
    """A command needs an optional part of the install (`pip install 'preftune[EXTRA]'`)."""


def require(extra: str, *modules: str, what: str) -> None:
    """Stop with one line naming the `pip install` to run when `what` needs modules of an extra
    that this install lacks; the base install is only what training needs."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingExtra(
                f"{what} needs the '{extra}' extra ({name} is not installed): pip install 'preftune[{extra}]'"
            ) from None
