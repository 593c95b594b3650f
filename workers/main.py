"""Starting a worker process: load the engine (once), then consume the model's queue.

The caller pins the GPU (`CUDA_VISIBLE_DEVICES`) before this module is imported, since importing
the engine imports torch.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

    from engine import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    """What `tokenmill worker` was asked to run."""

    model: str  # a model directory (tokenmill fetches a built-in model before it starts the worker),
    # or with load_format "dummy" a shape preset of engine.loader.DUMMY_SHAPES
    served_model: str
    device: str
    dtype: str
    database_url: str
    redis_url: str
    concurrency: int
    max_num_seqs: int | None  # None: sized from the device
    max_attempts: int
    visibility_timeout_s: int
    loglevel: str = "INFO"
    hostname: str | None = None
    num_kv_blocks: int | None = None  # None: sized from memory
    load_format: str = "auto"  # "dummy": random weights of the model's shape (engine.loader)
    shutdown_grace_s: float = 90.0  # after SIGTERM: finish held jobs for this long, then hand the rest back
    fault_crash_marker: str = ""  # test only (see tokenmill.settings)
    log_format: str = "text"  # "json": the caller configured logging; Celery must not replace it
    tensor_parallel_size: int = 1  # the engine's model processes (engine.parallel)
    bulk_tasks: int = 0  # of the `concurrency` slots, the most bulk tasks may hold; 0: all (workers.task_slots)


def default_hostname(served_model: str, device: str) -> str:
    """A worker's Celery node name when none is given: model-device-pid@host."""
    return f"{served_model}-{device.replace(':', '')}-{os.getpid()}@{socket.gethostname()}"


def device_label(device: str) -> str:
    """A readable name for usage rows: "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)"."""
    if not device.startswith("cuda"):
        return device
    import torch

    index = torch.device(device).index or 0
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def engine_config(opts: WorkerOptions) -> "EngineConfig":
    """The engine a worker with these options runs (benchmarks build the same one alone)."""
    from engine import EngineConfig

    return EngineConfig(model=opts.model, device=opts.device, dtype=opts.dtype, load_format=opts.load_format,
                        max_num_seqs=opts.max_num_seqs, num_kv_blocks=opts.num_kv_blocks,
                        tensor_parallel_size=opts.tensor_parallel_size)


def bulk_slots(opts: WorkerOptions) -> int:
    """How many of the worker's task slots bulk tasks may hold (0: all of them)."""
    if opts.bulk_tasks <= 0 or opts.bulk_tasks >= opts.concurrency:
        return 0
    return opts.bulk_tasks


def use_task_slots(app: "Celery", opts: WorkerOptions) -> None:
    """Makes the worker's consumer keep `concurrency - bulk_tasks` slots for interactive tasks."""
    from workers.task_slots import TRANSPORT

    slots = bulk_slots(opts)
    if not slots:
        log.warning("bulk tasks may hold all %d task slots (bulk tasks %d): an interactive task may wait "
                    "in Redis for a bulk task to finish", opts.concurrency, opts.bulk_tasks)
    app.conf.broker_transport = TRANSPORT
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "bulk_slots": slots}


def run_worker(opts: WorkerOptions) -> None:
    """Loads the engine, then runs the Celery worker until it is told to stop."""
    from celery import signals

    from contract import tracing
    from contract.celery_app import QueueConfig, declare_queues, make_celery
    from contract.liveness import new_instance_id
    from contract.queues import queue_for, worker_queue
    from engine import Engine
    from store.facade import Store
    from workers.engine_events import install_engine_figures
    from workers.prefix_index import PrefixPublisher
    from workers.recovery import Recoverer, kombu_restorer
    from workers.runtime import WorkerConfig, WorkerRuntime
    from workers.tasks import register_tasks

    hostname = opts.hostname or default_hostname(opts.served_model, opts.device)
    if opts.log_format == "json":
        # A receiver of setup_logging tells Celery to leave logging as configured (JSON lines).
        signals.setup_logging.connect(lambda **_: None, weak=False)
    log.info("loading %s on %s (tensor_parallel_size=%d)", opts.model, opts.device, opts.tensor_parallel_size)
    if opts.load_format == "dummy":
        log.warning("%s runs with random weights (--load-format dummy): its outputs are noise", opts.model)
    engine = Engine(engine_config(opts))
    store = Store.open(opts.database_url)
    instance = new_instance_id()  # new on every start, whatever the hostname (docs/reliability.md)
    rt = WorkerRuntime(WorkerConfig(served_model=opts.served_model, hostname=hostname,
                                    device_label=device_label(opts.device), redis_url=opts.redis_url,
                                    instance=instance, max_attempts=opts.max_attempts,
                                    fault_crash_marker=opts.fault_crash_marker), engine, store).start()
    app = make_celery(QueueConfig(redis_url=opts.redis_url, visibility_timeout_s=opts.visibility_timeout_s,
                                  worker_instance=instance))
    use_task_slots(app, opts)
    # Its own queue (prefix routing, docs/routing.md), consumed after the shared one at each
    # priority step: a routed job never overtakes a shared job of the same priority.
    own_queue = worker_queue(queue_for(opts.served_model), instance)
    declare_queues(app, [opts.served_model], extra=[own_queue])
    # Every live worker restores the tasks of dead ones (workers.recovery), this one included.
    recoverer = Recoverer(opts.redis_url, store, kombu_restorer(app),
                          own_lapsed=lambda: rt.heartbeat.lapsed).start()
    rt.prefixes = PrefixPublisher(opts.redis_url, queue_for(opts.served_model), instance)
    register_tasks(app, rt)
    install_engine_figures(app, rt)  # engine figures in worker stats and events (Flower)
    worker = app.Worker(
        hostname=hostname, pool="threads", concurrency=opts.concurrency,
        queues=[queue_for(opts.served_model), own_queue], loglevel=opts.loglevel,
        without_mingle=True, without_gossip=True, task_events=True,
    )
    # SIGTERM (or SIGINT): Celery's warm shutdown stops consuming and waits for the running tasks;
    # the runtime lets them finish for the grace period, then hands what is left back to the queue.
    # A cold shutdown (SIGQUIT) hands everything back at once.
    def on_shutting_down(how: str = "Warm", **_: object) -> None:
        rt.prefixes.withdraw()  # no more routed jobs; those waiting for it go to the shared queue
        rt.begin_shutdown(opts.shutdown_grace_s if how == "Warm" else 0.0)

    signals.worker_shutting_down.connect(on_shutting_down, weak=False)
    log.info("worker %s ready (instance %s): model %s, queue %s", hostname, instance, opts.served_model,
             queue_for(opts.served_model))
    rt.prefixes.start()
    try:
        worker.start()
    finally:
        rt.prefixes.stop()  # what waits in its own queue goes to the shared one
        recoverer.stop()
        rt.stop()
        store.close()
    code = getattr(worker, "exitcode", 0) or 0
    if code:
        raise SystemExit(code)
