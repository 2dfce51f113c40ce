"""Exceptions shared across moepress."""


class MoepressError(Exception):
    """An error caused by user input, printed as one line by the CLI.

    Raise it (with a message that says what was wrong and what to do) for bad
    paths, bad files, bad option values and the like; anything else is a bug
    and keeps its traceback.
    """
