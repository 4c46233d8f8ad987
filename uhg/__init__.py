"""uhg: deep generative surrogates for ultra-high-granularity particle detectors."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("uhg")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
