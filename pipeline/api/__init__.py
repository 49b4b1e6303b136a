"""The control plane: HTTP API, Prometheus metrics and the web page, served in the pipeline's loop."""

from .server import ApiError, ApiServer, local_api

__all__ = ["ApiError", "ApiServer", "local_api"]
