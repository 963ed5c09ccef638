"""Duties one process of the fleet holds at a time, under an advisory lock: the relay (publishing
what Postgres owes the broker), the published markers, the sweeper, and the leader lock they
share.
"""
