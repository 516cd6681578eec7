"""The one exception type of the config package (its own module so the key tables can raise it)."""


class ConfigError(ValueError):
    """A user error in the configuration: the message says what to change."""
