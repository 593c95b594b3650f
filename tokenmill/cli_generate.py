"""`tokenmill generate IN.jsonl -o OUT.jsonl`: offline bulk generation on the local engine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

CLI_DEFAULT_MAX_TOKENS = 256
WINDOW = 1024  # lines held in the engine at once: bounded memory for files of any length


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            yield number, raw


def parse_line(raw: bytes, defaults: dict[str, Any]) -> dict[str, Any]:
    """One input line -> {"prompt" or "messages", "params", "id"}. ValueError says what is wrong."""
    from engine import SamplingParams

    try:
        # Without the line break: an error at the end of the line is placed there, not at
        # "column 1" of a next line.
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    prompt, messages = obj.pop("prompt", None), obj.pop("messages", None)
    if (prompt is None) == (messages is None):
        raise ValueError('each line needs exactly one of "prompt" or "messages"')
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise ValueError('"prompt" must be a string or a list of token ids')
    if messages is not None and not isinstance(messages, list):
        raise ValueError('"messages" must be a list of {"role", "content"} objects')
    ident = obj.pop("id", None) if "id" in obj else obj.pop("custom_id", None)
    params = SamplingParams.from_dict({**defaults, **obj})
    return {"prompt": prompt, "messages": messages, "params": params, "id": ident}


def _result(number: int, ident: Any, out: Any = None, error: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"line": number}
    if ident is not None:
        row["id"] = ident
    if error is not None:
        row["error"] = error
        return row
    choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason}
               for c in out.outputs]
    row.update(text=out.text, finish_reason=out.finish_reason,
               prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
               cached_tokens=out.cached_tokens)
    if len(choices) > 1:
        row["choices"] = choices
    return row


def generate_file(engine: Any, src: Path, dst: Path, defaults: dict[str, Any],
                  progress: bool = True) -> dict[str, int]:
    """Runs every line of `src` through `engine`, writing one line per input line to `dst`, in order.

    Returns counts: lines, ok, errors, completion_tokens.
    """
    total = sum(1 for _ in _read_lines(src))
    done: dict[int, dict[str, Any]] = {}
    idents: dict[str, tuple[int, Any]] = {}
    counts = {"lines": total, "ok": 0, "errors": 0, "completion_tokens": 0}
    next_write = 1
    bar = task = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]:>8.1f} tok/s"), TimeRemainingColumn(),
                       transient=False)
        task = bar.add_task("generate", total=total, rate=0.0)
        bar.start()
    start = time.perf_counter()

    def finish(number: int, row: dict[str, Any]) -> None:
        done[number] = row
        counts["errors" if "error" in row else "ok"] += 1
        counts["completion_tokens"] += row.get("completion_tokens", 0)
        if bar is not None:
            rate = counts["completion_tokens"] / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=1, rate=rate)

    def step() -> None:
        for out in engine.step():
            if out.finished:
                number, ident = idents.pop(out.request_id)
                finish(number, _result(number, ident, out))

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with dst.open("w", encoding="utf-8") as f:
            def flush() -> None:
                nonlocal next_write
                while next_write in done:
                    f.write(json.dumps(done.pop(next_write), ensure_ascii=False) + "\n")
                    next_write += 1

            for number, raw in _read_lines(src):
                if not raw.strip():
                    finish(number, _result(number, None, error=f"line {number}: empty line"))
                    continue
                try:
                    item = parse_line(raw, defaults)
                    rid = f"line-{number}"
                    engine.add_request(rid, item["prompt"], item["params"], messages=item["messages"])
                    idents[rid] = (number, item["id"])
                except ValueError as e:
                    finish(number, _result(number, None, error=f"line {number}: {e}"))
                while len(idents) >= WINDOW:
                    step()
                flush()
            while engine.has_unfinished():
                step()
                flush()
            flush()
    finally:
        if bar is not None:
            bar.stop()
    return counts


def generate_command(
    input_file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True,
                                      help='JSONL: one {"prompt": ...} or {"messages": [...]} per line, '
                                           "with optional sampling fields (max_tokens, temperature, ...)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write one JSON result per input line."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory or built-in name.",
                                        show_default="TOKENMILL_MODEL"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N.",
                                         show_default="cuda when a GPU is visible, else cpu"),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    max_tokens: int = typer.Option(CLI_DEFAULT_MAX_TOKENS, help="Default max_tokens for lines that give none."),
    temperature: Optional[float] = typer.Option(None, help="Default temperature for lines that give none."),
    max_num_seqs: Optional[int] = typer.Option(
        None, help="Most sequences in one batch [default: from the device: 1,024 on a GPU of 70 GiB or more, else 256]."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    tensor_parallel_size: Optional[int] = typer.Option(
        None, "--tensor-parallel-size", "-tp", min=1,
        help="Split the model over this many GPUs (on the CPU: processes) [default: TOKENMILL_TENSOR_PARALLEL_SIZE]."),
) -> None:
    """Generate a completion for every line of a JSONL file, on the local engine. The model and the
    cache it is converted into come from the settings (TOKENMILL_MODEL, TOKENMILL_CACHE_DIR), as
    for every other command."""
    from rich.console import Console

    from tokenmill.settings import Settings

    console = Console(stderr=True)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    model = model or settings.model

    import torch

    from engine import Engine, EngineConfig
    from tokenmill.builtin_model import prepare_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults: dict[str, Any] = {"max_tokens": max_tokens}
    if temperature is not None:
        defaults["temperature"] = temperature
    try:
        model_dir = prepare_model(model, settings.model_cache_dir)
        engine = Engine(EngineConfig(model=str(model_dir), device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                                     tensor_parallel_size=tensor_parallel_size or settings.tensor_parallel_size))
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        console.print(f"[red]cannot load model {model!r}:[/red] {e}")
        raise typer.Exit(2)
    start = time.perf_counter()
    try:
        counts = generate_file(engine, input_file, output, defaults, progress=not no_progress)
    finally:
        engine.close()
    secs = time.perf_counter() - start
    console.print(f"{counts['ok']} of {counts['lines']} lines done, {counts['errors']} errors, "
                  f"{counts['completion_tokens']} tokens in {secs:.1f}s "
                  f"({counts['completion_tokens'] / max(secs, 1e-9):.1f} tok/s) -> {output}")
    if counts["errors"]:
        raise typer.Exit(1)
