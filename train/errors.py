"""The one exception type for user mistakes (bad config, missing file, impossible mesh).

Raised where the mistake is found, with a message that names it; the CLI catches it once
and prints a single line with a non-zero exit. Bugs still raise with their traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: config, paths, mesh, checkpoint compatibility."""


EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: "temporary failure; the user is invited to retry"


class Preempted(Exception):
    """The run received SIGTERM/SIGINT, saved a checkpoint and stopped: rerunning the same
    command resumes. The command line exits with `EXIT_PREEMPTED`, so that a scheduler can
    tell it from a finished run (0) and from a mistake in the input (2)."""
