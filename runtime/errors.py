"""User-facing errors: the CLI prints ``str(error)`` as one line and exits non-zero."""


class EdgediffError(Exception):
    """A problem the user can fix (bad input, missing file, missing provider); never a bug."""


class ModelFolderError(EdgediffError):
    """The model folder is missing, incomplete or corrupt."""


class ProviderError(EdgediffError):
    """An execution provider was asked for that this installation cannot run."""
