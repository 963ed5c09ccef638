"""Accepting a task, shared by the Python client and the HTTP API: batched inserts, the task type
cache, payload schemas and their checks, work moved off the event loop.
"""
