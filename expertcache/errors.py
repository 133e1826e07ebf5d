"""User-facing errors.

Every problem a user can cause (a bad path, a corrupt checkpoint, an impossible budget) is raised
as ExpertCacheError with a one-line message saying what is wrong and what to do; the CLI prints it
and exits non-zero. Anything else reaching the CLI is a bug in expertcache.
"""


class ExpertCacheError(Exception):
    """A problem with the user's input or files, explained in one actionable line."""


class CheckpointError(ExpertCacheError):
    """The model directory or its files are missing, unreadable or malformed."""


class BudgetError(ExpertCacheError):
    """The expert budget cannot be parsed or cannot hold one layer's working set."""


class ExpertLoadError(ExpertCacheError):
    """Reading an expert's bytes failed; raised where the computation waits for that expert."""
