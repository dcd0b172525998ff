"""User-facing errors: one line that names the problem and the fix.

The CLI prints these without a traceback; anything else that escapes is a bug.
"""


class LowbitError(Exception):
    """An error caused by input the user can fix."""


class ModelLoadError(LowbitError):
    pass


class UnsupportedArchitectureError(LowbitError):
    pass


class DataError(LowbitError):
    pass


class FormatError(LowbitError):
    pass


class ArtifactError(LowbitError):
    pass


class NonFiniteWeightError(LowbitError):
    pass


class NonFiniteActivationError(LowbitError):
    pass


class CheckpointError(LowbitError):
    pass


class BudgetError(LowbitError):
    pass
