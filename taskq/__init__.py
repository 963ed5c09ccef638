"""taskq: durable background tasks. RabbitMQ carries the work, Postgres holds the truth."""

from taskq.errors import TaskqError
from taskq.settings import Settings, load_settings

__version__ = "0.1.0"

__all__ = ["Settings", "TaskqError", "__version__", "load_settings"]
