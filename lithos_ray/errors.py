"""Errors a lithos user can act on. Each message says what was wrong and what is allowed."""


class LithosError(Exception):
    """Base class of lithos-ray errors."""


class LithosRequestError(LithosError, ValueError):
    """A request that can never be satisfied as written (bad TPC count, priority, SLO, GPU model)."""


class LithosPlacementTimeout(LithosError, TimeoutError):
    """No single GPU of the node had room for the grant within the acquire timeout."""


class LithosNotRunning(LithosError):
    """lithos (or Ray) is not running where it was looked for."""
