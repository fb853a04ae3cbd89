"""Storage: the Redis client and its scripts, the outbox, the Postgres reads, the resources a process opens.

Knows the record (``session_svc.record``), never HTTP or the domain's rules of who may do what.
"""
