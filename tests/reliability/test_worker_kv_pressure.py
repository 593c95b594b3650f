"""A flood of long prompts at a worker whose KV cache is small (`TOKENMILL_NUM_KV_BLOCKS`): the
engine runs out of blocks again and again and preempts (frees a request's blocks, recomputes it
later). Nothing crashes, every job finishes with exactly the tokens it asked for, and a preempted
job's greedy output is the one it gets with memory to spare."""

from __future__ import annotations

import random

from engine import LLM, SamplingParams
from relworker import assert_each_stored_once, jobs_by_id, payloads, submit, wait_final
from store.models import Result

KV_BLOCKS = 88  # 1,408 tokens of KV: four prompts fit, but not the four grown to their full length
JOBS = 32


def test_long_prompt_flood_on_a_small_kv_pool_preempts_and_finishes_everything(
        rel_store, rel_celery, rel_redis, rel_tenant, spawn_worker, rel_model_dir):
    rng = random.Random(15)
    bodies = payloads(rng, JOBS, (300, 336), (48, 64), return_token_ids=True)
    worker = spawn_worker(concurrency=JOBS,
                          extra_env={"TOKENMILL_NUM_KV_BLOCKS": str(KV_BLOCKS)})
    assert int(rel_redis.hget(worker.stats_key, "kv_blocks_total")) == KV_BLOCKS
    ids = submit(rel_store, rel_celery, rel_tenant, bodies)
    final = wait_final(rel_store, rel_tenant, JOBS, timeout=180)
    assert final == {"succeeded": JOBS}, dict(final)
    assert worker.alive(), worker.log()
    assert_each_stored_once(rel_store, ids, bodies)
    assert {j.attempts for j in jobs_by_id(rel_store, ids).values()} == {1}  # no job ran twice

    stats = {k.decode(): v.decode() for k, v in rel_redis.hgetall(worker.stats_key).items()}
    preemptions = int(stats["preemptions"])
    print(f"{JOBS} prompts of 300-336 tokens on {KV_BLOCKS} KV blocks: {preemptions} preemptions, "
          f"peak batch {stats['peak_batch_size']}")
    assert preemptions > 0, "the KV pool never ran out: nothing was tested"

    # The same prompts with memory to spare, in this process: the same tokens.
    with rel_store.db.read() as s:
        got = {r.job_id: r.token_ids for r in s.query(Result).filter(Result.job_id.in_(ids))}
    llm = LLM(str(rel_model_dir), device="cpu", dtype="float32")
    params = [SamplingParams.from_dict(b["params"]) for b in bodies]
    expected = [o.outputs[0].token_ids for o in llm.generate([b["prompt"] for b in bodies], params)]
    differ = [i for i, want in zip(ids, expected) if got[i] != list(want)]
    assert not differ, f"{len(differ)} of {JOBS} outputs changed under preemption"
