"""How Flower shows tokenmill tasks: model, job ids and token counts, nothing long or private."""

from __future__ import annotations

from types import SimpleNamespace

from workers.flower_format import format_task
from workers.engine_events import engine_fields


def _task(**kw):
    base = {"name": "tokenmill.generate", "uuid": "job_abc", "args": "['job_abc', 1732712345.1]", "kwargs": "{}",
            "result": None, "routing_key": "tokenmill.smollm2-135m-instruct"}
    return SimpleNamespace(**{**base, **kw})


def test_a_single_job_shows_its_model_and_token_counts():
    t = format_task(_task(result="{'succeeded': 1, 'failed': 0, 'skipped': 0, 'prompt_tokens': 37, "
                                 "'completion_tokens': 8}"))
    assert t.args == "model smollm2-135m-instruct · this job"
    assert t.kwargs == ""
    assert t.result == "succeeded · 37 in / 8 out tokens"


def test_a_bulk_chunk_shows_its_span_and_outcomes():
    ids = [f"job_{i:03d}" for i in range(64)]
    t = format_task(_task(name="tokenmill.generate_bulk", uuid="job_000-bulk", args=f"[{ids!r}, 1.0]",
                          result="{'succeeded': 60, 'failed': 4, 'prompt_tokens': 2100, 'completion_tokens': 6400}"))
    assert t.args == "model smollm2-135m-instruct · 64 bulk jobs: job_000 … job_063"
    assert t.result == "succeeded 60 · failed 4 · 2,100 in / 6,400 out tokens"


def test_other_tasks_are_cut_short():
    t = format_task(_task(name="other.task", args="['" + "x" * 5000 + "']", result="y" * 300))
    assert len(t.args) < 260 and "5004 characters" in t.args
    assert t.result.startswith("y" * 200) and "300 characters" in t.result


def test_engine_figures_become_numbers_in_a_readable_order():
    fields = engine_fields({"updated_at": "1.0", "steps": "9", "model": "m", "tokens_per_s": "12.5", "running": "3"})
    assert list(fields) == ["model", "running", "tokens_per_s", "steps"]
    assert fields["running"] == 3 and fields["tokens_per_s"] == 12.5
