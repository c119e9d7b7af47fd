"""Exceptions with messages that name the file and the key at fault."""


class ConfigError(ValueError):
    """A configuration file or key is malformed, unknown or missing."""


class DataError(ValueError):
    """A data file is missing, corrupt, or holds values out of range."""
