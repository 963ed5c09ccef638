"""The HTTP side: the ASGI app and its hot enqueue route, the admin API, the dashboard, the event
stream, OpenAPI, monitoring, cursors and the Host check.
"""
