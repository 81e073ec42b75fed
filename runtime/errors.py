"""User-facing errors: the CLI prints ``str(error)`` as one line and exits non-zero."""


class EdgediffError(Exception):
    """A problem the user can fix (bad input, missing file, missing provider); never a bug."""


class ModelFolderError(EdgediffError):
    """The model folder is missing, incomplete or corrupt."""


class ProviderError(EdgediffError):
    """An execution provider was asked for that this installation cannot run."""


class InputError(EdgediffError):
    """An argument of a generation (size, seed, steps, image, ...) is not usable."""


class GraphInputError(EdgediffError):
    """A tensor fed to a graph does not match what the manifest says the graph takes."""


class OutOfMemoryError(EdgediffError):
    """A generation needs (or asked for) more memory than there is."""
