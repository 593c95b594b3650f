"""tokenmill's workers: where the Redis queue meets the engine.

Everything here runs inside a worker process. What the workers share with whoever sends them work
(the Celery app, task and queue names, the job payload, the Redis channels) is in `contract`.
"""
