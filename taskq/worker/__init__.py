"""The worker: consuming envelopes, claiming in batches, running handlers in the sandbox (threads
for sync ones), recording outcomes, and the supervisor of --processes.
"""
