"""Exceptions with messages a user can act on (ComfyUI shows only the message to headless callers)."""


class FaceMendError(Exception):
    """Base class for every error FaceMend raises on purpose."""


class ModelFileNotFound(FaceMendError, FileNotFoundError):
    """A model file is not in any of the searched folders."""


class ModelFileInvalid(FaceMendError, ValueError):
    """A model file exists but is corrupt or holds a different model than expected."""


class InvalidImage(FaceMendError, ValueError):
    """An input image cannot be processed (wrong shape, empty, too large)."""


class Interrupted(FaceMendError):
    """The user stopped the run; raised between batches/tiles/steps so no half state is returned."""
