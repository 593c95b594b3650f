"""`tokenmill worker`: a GPU-pinned (or CPU) worker process, or one per visible GPU."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import typer


def worker_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory or built-in name [default: TOKENMILL_MODEL]."),
    served_name: Optional[str] = typer.Option(None, help="Name clients use for the model [default: the model's name]."),
    gpu: Optional[int] = typer.Option(None, "--gpu", help="Pin this worker to one GPU index."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help='"all": one worker process per visible GPU.'),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, or cuda (default: cuda if --gpu is given, else cpu)."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    load_format: str = typer.Option(
        "auto", "--load-format",
        help="auto or safetensors: the model's weights; dummy: random weights of the model's shape, for "
             "benchmarks (--model is then a directory with a config.json, or a shape preset: "
             "smollm2-135m, qwen3-0.6b, llama-3.1-8b)."),
    concurrency: Optional[int] = typer.Option(None, help="Tasks held at once [default: TOKENMILL_WORKER_CONCURRENCY]."),
    bulk_tasks: Optional[int] = typer.Option(
        None, min=1, help="Of those, the most bulk tasks may hold; the rest are kept for interactive tasks "
                          "[default: TOKENMILL_WORKER_BULK_TASKS]."),
    max_num_seqs: Optional[int] = typer.Option(None, help="Sequences per engine batch [default: TOKENMILL_MAX_NUM_SEQS]."),
    num_kv_blocks: Optional[int] = typer.Option(None, help="KV cache blocks of 16 tokens; 0: sized from memory [default: TOKENMILL_NUM_KV_BLOCKS]."),
    tensor_parallel_size: Optional[int] = typer.Option(
        None, "--tensor-parallel-size", "-tp", min=1,
        help="Split the model over this many GPUs (on the CPU: processes); with --gpus all, one worker per "
             "group of this many GPUs [default: TOKENMILL_TENSOR_PARALLEL_SIZE]."),
    hostname: Optional[str] = typer.Option(None, help="Celery node name [default: model-device-pid@host]."),
    loglevel: str = typer.Option("INFO", help="Log level."),
) -> None:
    """Run a worker that takes the model's jobs from Redis and runs them on the engine."""
    from tokenmill.settings import Settings

    settings = Settings.from_env()
    # A worker's metrics travel through Redis (workers.metrics), never through the API's
    # multiprocess directory: set for the whole host, it would count them twice.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    model = model or settings.model
    served = served_name or os.path.basename(os.path.normpath(model))
    tp = tensor_parallel_size or settings.tensor_parallel_size
    if settings.log_format != "json":  # JSON: configured below, once the worker's name is known
        logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if gpus is not None:
        if gpus != "all":
            raise typer.BadParameter('only "all" is accepted', param_hint="--gpus")
        from tokenmill.gpus import visible_gpu_ids
        from tokenmill.supervisor import supervise

        if settings.log_format == "json":
            from tokenmill.log_format import configure_logging

            configure_logging("json", loglevel)
        from tokenmill.gpus import gpu_groups

        ids = visible_gpu_ids()
        if not ids:
            typer.echo("no GPU is visible (nvidia-smi finds none); run with --device cpu", err=True)
            raise typer.Exit(2)
        try:
            groups = gpu_groups(ids, tp)
        except ValueError as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(2)
        base = [sys.executable, "-m", "tokenmill.cli", "worker", "--model", model, "--served-name", served,
                "--dtype", dtype, "--load-format", load_format, "--loglevel", loglevel,
                "--tensor-parallel-size", str(tp)]
        for flag, value in (("--concurrency", concurrency), ("--bulk-tasks", bulk_tasks),
                            ("--max-num-seqs", max_num_seqs),
                            ("--num-kv-blocks", num_kv_blocks)):
            if value is not None:
                base += [flag, str(value)]
        # One worker per group: it sees its group's GPUs as cuda:0..N-1, one per rank.
        raise typer.Exit(supervise([base + ["--device", "cuda"] for _ in groups],
                                   [{"CUDA_VISIBLE_DEVICES": ",".join(g)} for g in groups]))
    if gpu is not None:
        # Pinning must happen before torch is imported (by the engine, below). Under tensor
        # parallelism the worker takes GPUs gpu..gpu+N-1.
        if os.environ.get("CUDA_VISIBLE_DEVICES") is None or "," in os.environ["CUDA_VISIBLE_DEVICES"]:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu + i) for i in range(tp))
        device = device or "cuda"
    device = device or "cpu"
    if device.startswith("cuda") and device != "cuda":
        device = "cuda"  # the pinned GPU is always index 0 inside the process (rank r: index r)

    from workers.main import default_hostname  # torch-free: the engine loads later

    hostname = hostname or default_hostname(served, device)
    if settings.log_format == "json":
        from tokenmill.log_format import configure_logging

        configure_logging("json", loglevel, worker=hostname)
    if settings.otel_endpoint:
        from tokenmill.tracing import configure_tracing

        configure_tracing(settings.otel_endpoint, "tokenmill-worker")

    from tokenmill.builtin_model import prepare_model

    try:
        if load_format == "dummy" and not os.path.isdir(os.path.expanduser(model)):
            model_dir = _dummy_shape(model)  # random weights of a preset shape: nothing to fetch
        else:
            model_dir = prepare_model(model, settings.model_cache_dir)  # after the pinning: converting imports torch
    except (ValueError, RuntimeError) as e:
        typer.echo(f"cannot load model {model!r}: {e}", err=True)
        raise typer.Exit(2)

    from workers.main import WorkerOptions, run_worker

    run_worker(WorkerOptions(
        model=str(model_dir), served_model=served, device=device, dtype=dtype, load_format=load_format,
        database_url=settings.database_url, redis_url=settings.redis_url,
        concurrency=concurrency or settings.worker_concurrency,
        bulk_tasks=bulk_tasks or settings.worker_bulk_tasks,
        max_num_seqs=max_num_seqs or settings.max_num_seqs or None, max_attempts=settings.max_attempts,
        visibility_timeout_s=settings.visibility_timeout_s,
        loglevel=loglevel.upper(), hostname=hostname,
        num_kv_blocks=(settings.num_kv_blocks if num_kv_blocks is None else num_kv_blocks) or None,
        shutdown_grace_s=settings.shutdown_grace_s, fault_crash_marker=settings.fault_crash_marker,
        log_format=settings.log_format, tensor_parallel_size=tp))


def _dummy_shape(name: str) -> str:
    """A shape preset's name, checked (engine.loader.DUMMY_SHAPES) before the worker starts."""
    from engine.loader import DUMMY_SHAPES

    if name not in DUMMY_SHAPES:
        raise ValueError(f"with --load-format dummy, --model is a directory with a config.json or a shape preset "
                         f"({', '.join(DUMMY_SHAPES)})")
    return name
