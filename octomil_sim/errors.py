"""The one error type that reaches people: a bad config value, said in one line."""


class ConfigError(ValueError):
    """A config value that cannot work: the message names the key, the value and what is allowed."""
