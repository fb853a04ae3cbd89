"""The HTTP API: the app factory, routes, parsing, errors, auth, the OpenAPI document, the server.

The top layer: nothing else in the service imports it, and the worker process never loads it.
"""
