"""User-facing errors: each carries a one-line cause that the CLI prints before exiting non-zero."""


class CkptflowError(Exception):
    """A problem with the user's input or environment (not a bug in ckptflow)."""


class UnsupportedModelError(CkptflowError):
    pass


class CorruptFileError(CkptflowError):
    pass


class MappingError(CkptflowError):
    """Missing, unexpected or wrongly shaped tensors between the two sides."""


class OutputExistsError(CkptflowError):
    pass
