"""User-facing errors.

Every mistake a user can make (a bad parameter file, a missing frame file, an unreadable CIF)
raises a subclass of :class:`MidasflowError` whose message is one line naming the file, key or
line and what was expected. The CLI prints that line and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class MidasflowError(Exception):
    """Base class of every user-facing midasflow error."""


class ParameterError(MidasflowError):
    """A MIDAS parameter file or a command-line override is invalid."""


class FrameError(MidasflowError):
    """Raw frames (or darks, masks) cannot be opened or do not match the parameters."""


class CakeFileError(MidasflowError):
    """A caked store (.zarr.zip or zarr) is missing or does not have the expected layout."""


class CIFError(MidasflowError):
    """A CIF cannot be read or lacks the cell or symmetry."""


class InstprmError(MidasflowError):
    """A GSAS-II .instprm file is invalid."""


class PatternError(MidasflowError):
    """A 1D pattern cannot be refined (empty, all zero, mismatched arrays)."""


class BackendError(MidasflowError):
    """A refinement backend cannot be used here (e.g. GSAS-II is not importable)."""


class OutputPathError(MidasflowError):
    """An output folder is a file, or cannot be created or written."""


class OutputInUseError(MidasflowError):
    """Another live midasflow process is writing the same output (it holds the lock)."""


class UsageError(MidasflowError):
    """The command line is not understood: an unknown flag, a missing or malformed argument."""
