"""The harness's own errors: one base class, so a caller can tell bad input from a bug."""


class HarnessError(Exception):
    """Base class of the harness's own errors: bad input, named and explained."""
