"""The one exception type the command line turns into a one-line error, exit code 2."""


class UsageError(Exception):
    """Bad input from the user: a message naming the problem, raised before work starts."""
