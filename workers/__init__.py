"""tokenmill's workers: where the Redis queue meets the engine.

`workers.app` (the Celery app, task names, queue names, payload shapes) imports neither torch nor
the engine, so the API can send tasks with it. Everything else here runs inside a worker process.
"""
