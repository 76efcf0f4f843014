"""sserelay's composition root: settings, the app factory, routes, errors, the CLI."""

from .factory import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
