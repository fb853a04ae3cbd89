"""Domain operations: create, append, update, read, with ownership, idempotency and cold reads; totals.

What a request means, independent of HTTP; the worker uses it too.
"""
