"""mailpush: push each new mail to the device its owner is using right now."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mailpush")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
