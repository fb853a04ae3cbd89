"""The record: what a session, a message and a memory are, in Redis, in Postgres and in JSON.

``fields`` declares every field once; ``keys`` names the Redis keys; ``shapes`` turns stored values into
the guide's JSON; ``models`` validates what clients send and documents what they get. Nothing here talks
to a server.
"""
