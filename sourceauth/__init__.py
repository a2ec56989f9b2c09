"""sourceauth: challenge-response source authentication for mail servers.

The distribution installs the repository's `engine/`, `adapters/` and `specs/` folders as
`sourceauth.engine`, `sourceauth.adapters` and `sourceauth.specs` (see pyproject.toml).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sourceauth")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+checkout"
