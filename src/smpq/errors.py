"""The one exception type for user mistakes; the CLI turns it into a one-line error, exit 2."""

__all__ = ["SmpqError"]


class SmpqError(ValueError):
    """A problem with the user's input (files, policies, budgets, models), not a bug."""
