"""The engine on CUDA: greedy parity with transformers (float32 token for token; bfloat16 within each
other's top 5 at the first difference), with and without CUDA graphs; padded graph rows that touch
no real sequence; the KV pool sized from free GPU memory.

Every test needs a GPU except the first, which runs the padded decode path (static buffers, slot
-1, context length 0) eagerly on the CPU. The tiny models are written here with token-id prompts
and no tokenizer, so no converted SmolLM2 directory is needed on the GPU machine.
"""

from __future__ import annotations

import gc
import itertools
import random

import pytest
import torch
from tiny_models import TINY_ARCHS, tiny_config

from engine import LLM, SamplingParams
from engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from engine.kv_sizing import kv_bytes_per_block

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

VOCAB = 512
ARCHS = list(TINY_ARCHS)
MAX_TOKENS = [12, 20, 7, 16, 9, 14, 30, 3]
GRAPHS = {"graphs": {"enforce_eager": False}, "eager": {"enforce_eager": True}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Factory: a tiny random model directory of an architecture variant, without a tokenizer."""
    made = {}

    def make(arch: str):
        if arch not in made:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB), dtype=torch.float32)
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():  # biases and norms random too, as in tiny_models.make_tiny_model
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                    elif "norm" in name:
                        p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            d = tmp_path_factory.mktemp(f"gpu-tiny-{arch}")
            model.save_pretrained(str(d))
            made[arch] = d
        return made[arch]

    return make


def make_prompts(seed: int) -> list[list[int]]:
    """Mixed lengths, three sharing a 21-token prefix; more prompts than the smallest graphs."""
    rng = random.Random(seed)

    def rand(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    shared = rand(21)
    return [shared + rand(5), rand(40), shared + rand(1), rand(3), shared + rand(17), rand(11), rand(70), rand(2)]


def hf_greedy(model_dir, prompts, max_tokens, dtype, device):
    """transformers greedy outputs and, per generated position, its log-softmax [steps, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa").to(device).eval()
    model.generation_config.eos_token_id = None
    tokens, logprobs = [], []
    with torch.inference_mode():
        for p, n in zip(prompts, max_tokens):
            ids = torch.tensor([p], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            tokens.append(out.sequences[0, len(p):].tolist())
            logprobs.append(torch.log_softmax(torch.cat(out.logits).float(), dim=-1).cpu())
    del model
    return tokens, logprobs


def engine_greedy(model_dir, prompts, max_tokens, dtype, **kwargs):
    llm = LLM(str(model_dir), device="cuda", dtype=dtype, max_num_seqs=16, num_kv_blocks=256, **kwargs)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=5) for n in max_tokens]
    outs = llm.generate(prompts, params)
    graphs = llm.engine.runner.graphs
    replays = graphs.replays if graphs is not None else 0
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks  # nothing leaked
    return outs, replays


def test_padded_decode_rows_leave_real_sequences_alone_on_cpu(tmp_path):
    """The graph path's buffers and padding, run eagerly on the CPU: same tokens as plain eager."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB), dtype=torch.float32).save_pretrained(str(tmp_path))
    prompts = make_prompts(0)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in MAX_TOKENS]
    expected = [o.token_ids for o in LLM(str(tmp_path), dtype="float32").generate(prompts, params)]

    llm = LLM(str(tmp_path), dtype="float32", max_num_seqs=8)
    runner = llm.engine.runner
    # Sizes 2, 4, 8: most decode steps are padded (8 prompts finishing at different lengths).
    runner.graphs = DecodeGraphs(runner._forward_logits, 8, runner.max_blocks_per_seq, runner.max_model_len,
                                 runner.device, sizes=[2, 4, 8], use_graphs=False)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == expected
    assert runner.graphs.replays > 0


def test_graph_batch_sizes_cover_every_batch_up_to_the_cap():
    sizes = graph_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and all(b - a <= 16 for a, b in itertools.pairwise(sizes))
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(1) == [1]
    large = graph_batch_sizes(1024)  # every decode batch of the large-card default replays a graph
    assert large[-1] == 1024 and large[:20] == sizes[:20]
    assert all(b - a <= 32 for a, b in itertools.pairwise(large)) and len(large) <= 48


@needs_cuda
@pytest.mark.parametrize("mode", list(GRAPHS))
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_greedy_matches_transformers_token_for_token(arch, mode, tiny_dir):
    prompts = make_prompts(ARCHS.index(arch))
    expected, _ = hf_greedy(tiny_dir(arch), prompts, MAX_TOKENS, torch.float32, "cuda")
    outs, replays = engine_greedy(tiny_dir(arch), prompts, MAX_TOKENS, "float32", **GRAPHS[mode])
    assert [o.token_ids for o in outs] == expected
    assert (replays > 0) == (mode == "graphs")


@needs_cuda
@pytest.mark.parametrize("mode", list(GRAPHS))
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_first_difference_is_within_each_others_top5(arch, mode, tiny_dir):
    prompts = make_prompts(ARCHS.index(arch))
    hf_tokens, hf_logprobs = hf_greedy(tiny_dir(arch), prompts, MAX_TOKENS, torch.bfloat16, "cuda")
    outs, replays = engine_greedy(tiny_dir(arch), prompts, MAX_TOKENS, "bfloat16", **GRAPHS[mode])
    assert (replays > 0) == (mode == "graphs")
    for out, ref, ref_lp in zip(outs, hf_tokens, hf_logprobs):
        ours = out.token_ids
        assert len(ours) == len(ref)
        diff = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if diff is None:
            continue
        our_top5 = {t for t, _ in out.logprobs[diff].top}
        hf_top5 = set(ref_lp[diff].topk(5).indices.tolist())
        assert ref[diff] in our_top5, (diff, ours[diff], ref[diff], our_top5)
        assert ours[diff] in hf_top5, (diff, ours[diff], ref[diff], hf_top5)


@needs_cuda
def test_padded_rows_in_the_decode_kernel_write_nothing_and_read_nothing():
    """Rows with slot -1 and context length 0 (graph padding) beside real decodes: the real rows
    equal the reference, the padded rows come out finite, and the cache changes only at real slots."""
    from kernels.attention import paged_attention_ref
    from kernels.metadata import AttnMetadata
    from kernels.triton.attention import paged_attention_triton, write_kv_triton

    gen = torch.Generator(device="cuda").manual_seed(random.randrange(1 << 30))
    blocks, bs, hkv, hq, d = 128, 16, 8, 32, 128
    k_cache = torch.randn((blocks, bs, hkv, d), generator=gen, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    k_cache[0].fill_(float("nan"))  # block 0 is what padded rows' (zero) tables point at
    v_cache[0].fill_(float("nan"))
    real, pad = 5, 11
    n = real + pad
    ctx = torch.tensor([37, 1, 200, 16, 99] + [0] * pad, dtype=torch.int32, device="cuda")
    tables = torch.zeros((n, 16), dtype=torch.int32, device="cuda")
    tables[:real] = torch.randperm(blocks - 1, device="cuda")[:real * 16].view(real, 16).int() + 1
    pos = (ctx[:real] - 1).long()
    slots = torch.full((n,), -1, dtype=torch.int64, device="cuda")
    slots[:real] = tables[torch.arange(real, device="cuda"), pos // bs].long() * bs + pos % bs
    q = torch.randn((n, hq, d), generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn((n, hkv, d), generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    before_k = k_cache.clone()
    write_kv_triton(k, v, k_cache, v_cache, slots)
    changed = (k_cache != before_k) & ~torch.isnan(before_k)
    assert int(changed.any(dim=(2, 3)).sum()) <= real  # at most one slot per real row
    assert torch.isnan(k_cache[0]).all() and torch.isnan(v_cache[0]).all()
    for splits in (1, 4, 16):
        meta = AttnMetadata(slot_mapping=slots, query_start_loc=torch.arange(n + 1, dtype=torch.int32, device="cuda"),
                            context_lens=ctx, block_tables=tables, max_query_len=1, max_context_len=2048)
        out = paged_attention_triton(q, k_cache, v_cache, meta, d**-0.5, num_splits=splits)
        assert torch.isfinite(out).all()
        real_meta = AttnMetadata(slot_mapping=slots[:real], query_start_loc=meta.query_start_loc[:real + 1],
                                 context_lens=ctx[:real], block_tables=tables[:real], max_query_len=1,
                                 max_context_len=200)
        ref = paged_attention_ref(q[:real].float(), k_cache.float(), v_cache.float(), real_meta, d**-0.5)
        err = (out[:real].float() - ref).norm() / ref.norm()
        assert err < 1.2e-2, (splits, float(err))


@needs_cuda
def test_kv_pool_is_sized_from_free_gpu_memory_and_runs():
    gc.collect()
    torch.cuda.empty_cache()
    _free, total = torch.cuda.mem_get_info()
    llm = LLM("smollm2-135m", device="cuda", load_format="dummy", gpu_memory_utilization=0.3,
              max_num_seqs=256, max_num_batched_tokens=1024, max_model_len=8192)
    engine = llm.engine
    assert engine.dtype == torch.bfloat16  # dtype auto -> the config's bfloat16 on CUDA
    kv_bytes = engine.num_blocks * kv_bytes_per_block(engine.info, engine.block_size, engine.dtype)
    # 256 sequences of 8192 tokens would need about 48 GB, so the budget is what limits the pool:
    # 30% of the card less the weights, the context and a step's activations (well under 10%).
    assert 0.2 * total < kv_bytes <= 0.3 * total, (kv_bytes / 2**30, total / 2**30)
    outs = llm.generate([[5, 6, 7] * 40, [9] * 7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [40, 40]
    assert engine.runner.graphs is not None and engine.runner.graphs.replays > 0
    assert engine.kv.num_free_blocks == engine.num_blocks
