"""The command line's own error: a problem in the user's configuration or data, reported in one line."""


class ConfigError(ValueError):
    """A problem in the user's configuration; the message names the key or file."""


#: Modules the command line needs beyond the library (the ``cli`` extra of ``pyproject.toml``).
CLI_MODULES = ("yaml", "datasets", "PIL", "numpy", "sacrebleu", "pycocoevalcap", "matplotlib")


def missing_cli_modules() -> list[str]:
    """The :data:`CLI_MODULES` that are not installed (looked up without importing them)."""
    from importlib.util import find_spec

    return [name for name in CLI_MODULES if find_spec(name) is None]
