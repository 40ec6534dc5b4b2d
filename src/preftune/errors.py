"""The one exception type users see.

A `PreftuneError` is a mistake the user can fix (bad file, bad key, model that will not load).
The CLI prints its message as one line on stderr and exits non-zero, without a traceback unless
`--debug` is given. Messages name the file, line and field where there is one.
"""


class PreftuneError(Exception):
    """A user-facing error: its message is the whole story, printed on one line.

    Example::

        try:
            preftune.train({"learning_rat": 1e-4})
        except preftune.PreftuneError as exc:
            print(exc)  # config: unknown key 'learning_rat' (did you mean 'learning_rate'?)
    """


class Interrupted(PreftuneError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint: exit like an interrupted program."""

    exit_code = 130
