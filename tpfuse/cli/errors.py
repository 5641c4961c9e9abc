"""The one error the command line prints: what was wrong and what is accepted, in one line (rc 2)."""


class CommandError(Exception):
    """A problem with what the user typed or has, said in one line (the traceback only with -v)."""
