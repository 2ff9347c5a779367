"""The GPU worker: loads a registry model and runs generation jobs from its Celery queue."""
