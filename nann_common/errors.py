"""Domain errors shared by every stage: raised anywhere, reported once by each command line or the server."""


class NannError(Exception):
    """Base class of every error the CLI reports as a one-line message (exit code 2)."""


class InputError(NannError):
    """The interactions file (or a flag about it) is unusable; the message says how to fix it."""


class ArtifactError(NannError):
    """A workdir artifact is missing, damaged or was produced with other parameters."""
