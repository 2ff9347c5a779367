"""What the gateway and the workers must agree on.

Everything that crosses Redis (jobs, stream events, heartbeats), the Redis key names, the
model registry (models.json) and the settings both processes share live here. Neither
``gateway`` nor ``worker`` is imported from this package: it sits below both.
"""
