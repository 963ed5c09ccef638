"""Settings of the example project: one app (orders), on the database taskq uses.

The database comes from taskq's own settings (``TASKQ_DATABASE_URL``, ``.env``), so
that an order and its task are written in one transaction; Django must use psycopg 3
(``pip install 'taskq[psycopg]'``), which it picks when it is installed.
"""

import os
from urllib.parse import unquote, urlsplit

from taskq import load_settings

_url = urlsplit(load_settings().database_url)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "an-example-only-key-never-use-it-in-production")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
INSTALLED_APPS = ["orders"]
MIDDLEWARE: list[str] = []  # a JSON API without sessions (and so without CSRF cookies)
ROOT_URLCONF = "mysite.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _url.path.lstrip("/"),
        "USER": unquote(_url.username or ""),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": _url.hostname or "",
        "PORT": str(_url.port or ""),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
