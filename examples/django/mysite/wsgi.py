"""The WSGI application (``gunicorn mysite.wsgi``): each forked worker connects on its own."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
application = get_wsgi_application()
