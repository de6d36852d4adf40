"""The one exception type users see.

Every failure caused by the user's input (a missing file, a wrong shape, a tree deeper than the
heads) is raised as :class:`ForgeError` with a one-line message that names the problem and, where
there is one, the fix. The CLI prints that line and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class ForgeError(Exception):
    """A user-facing error: the message is the whole story, no traceback needed."""
