"""The errors sisray raises for bad input. Job entry points print them without a traceback."""


class Interrupted(Exception):
    """The work stopped early on Ctrl-C and saved what it had; the same command resumes it. The
    message says what was left (a job exits 130, like a KeyboardInterrupt)."""


class SisrayError(Exception):
    """Bad input or state that the user can fix; the message says what and where."""


class ConfigError(SisrayError):
    """A configuration key, value or file that is not allowed."""


class DatasetError(SisrayError):
    """A dataset root, file or sample that cannot be used."""


class ModelError(SisrayError):
    """A model name, checkpoint or weight file that cannot be used."""


class StorageError(SisrayError):
    """A run directory or file location that cannot be opened, read or written."""


class TrackingError(SisrayError):
    """The tracking store cannot be reached when a job opens its run (mid-run, tracking only warns)."""
