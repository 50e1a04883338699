"""The error users see for bad configuration: one line naming the field and what is allowed."""


class ConfigError(ValueError):
    """A configuration value is invalid; the CLI prints the message alone and exits with code 2."""


def require(condition: bool, field: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"<field>: <message>"`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")
