"""The one exception type for user mistakes (bad config, missing file, impossible mesh).

Raised where the mistake is found, with a message that names it; the CLI catches it once
and prints a single line with a non-zero exit. Bugs still raise with their traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: config, paths, mesh, checkpoint compatibility."""
