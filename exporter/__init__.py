"""step-runner-exporter: a byte-transparent sidecar that classifies GitLab step-runner jobs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("step-runner-exporter")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
