"""What a job is and how it travels: the one contract between the API, the workers and the CLI.

Importable without torch, FastAPI or SQLAlchemy (Celery, kombu and redis are fine), so an API
process stays light and the engine can share the sampling rules:

- `contract.celery_app`: the Celery app factory and the two ways to send a job's task;
- `contract.queues`: task names, queue names and the priority steps inside a queue;
- `contract.redis_keys`: the pub/sub channels and Redis keys the API and the workers share;
- `contract.payload`: the ``request`` a job stores;
- `contract.sampling`: the sampling fields, their defaults and limits (the engine's too);
- `contract.model_card`: what a model directory says about its context length and chat template;
- `contract.redis_transport`: kombu's Redis transport with one reused client per channel.

Nothing is imported here on purpose: the engine imports `contract.sampling` alone and must not
load Celery with it.
"""
