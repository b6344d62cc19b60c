"""The one exception type for user mistakes: the command line prints its message as one line."""


class UserError(Exception):
    """A mistake in what the user asked for (a name, a path, a value), not a bug.

    Entry points catch it and print ``error: <message>`` on one line, with exit status 2.
    """
