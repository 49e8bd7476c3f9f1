"""The one error type that reaches people: a bad config value, said in one line."""


class ConfigError(ValueError):
    """A config value that cannot work: the message names the key, the value and what is allowed."""


def instantiate(node, **kwargs):
    """Hydra's ``instantiate``, letting a ``ConfigError`` raised inside a constructor through as
    itself (Hydra wraps it in a multi-line ``InstantiationException``)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
