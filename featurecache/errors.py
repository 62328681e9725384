"""The base exception of featurecache: bad input reported in one line naming the file."""


class FeaturecacheError(ValueError):
    """Bad input or state; ``str(error)`` is one line that names the file and the problem.

    The command line prints it as ``Error: <message>`` and exits with status 1, without a
    traceback. Library users can catch it to tell bad input from bugs.
    """
