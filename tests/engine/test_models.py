"""Our paged-KV Llama-family model against transformers, logit for logit, and the loader's rules."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from engine.loader import (
    DUMMY_SHAPES,
    UnsupportedModelError,
    dummy_config,
    load_hf_config,
    load_model,
    resolve_model,
)
from kernels import AttnMetadata
from tiny_models import TINY_ARCHS, make_tiny_model

BLOCK_SIZE = 4


class PagedBatches:
    """Lays out steps of several sequences as flat batches over a shuffled pool of cache blocks,
    the way the runner does, so the model is exercised through non-contiguous block tables."""

    def __init__(self, model, num_seqs: int, max_len: int, seed: int = 0) -> None:
        blocks_per_seq = -(-max_len // BLOCK_SIZE)
        num_blocks = num_seqs * blocks_per_seq + 3
        order = list(range(num_blocks))
        random.Random(seed).shuffle(order)
        self.block_tables = torch.tensor(order[: num_seqs * blocks_per_seq], dtype=torch.int32).view(
            num_seqs, blocks_per_seq
        )
        cfg = model.config
        shape = (num_blocks, BLOCK_SIZE, cfg.num_key_value_heads, model.head_dim)
        # Filled with large garbage: an unmasked read of a slot never written wrecks the logits.
        # (Not NaN: the reference decode attention multiplies masked-out values by 0, and 0 * NaN
        # is NaN, so it needs finite memory outside a sequence's context.)
        gen = torch.Generator().manual_seed(seed)
        self.kv_caches = [
            (torch.randn(shape, generator=gen) * 1e3, torch.randn(shape, generator=gen) * 1e3)
            for _ in range(cfg.num_hidden_layers)
        ]
        self.lengths = [0] * num_seqs

    def step(self, model, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Runs new tokens `chunks[seq]` of each listed sequence as one batch; returns their logits."""
        ids, positions, slots, starts, ctx = [], [], [], [0], []
        seqs = sorted(chunks)
        for s in seqs:
            for tok in chunks[s]:
                pos = self.lengths[s]
                ids.append(tok)
                positions.append(pos)
                slots.append(int(self.block_tables[s, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
                self.lengths[s] += 1
            starts.append(len(ids))
            ctx.append(self.lengths[s])
        meta = AttnMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            block_tables=self.block_tables[seqs],
            max_query_len=max(len(chunks[s]) for s in seqs),
            max_context_len=max(ctx),
        )
        hidden = model(torch.tensor(ids), torch.tensor(positions), self.kv_caches, meta)
        logits = model.compute_logits(hidden)
        return {s: logits[starts[i] : starts[i + 1]] for i, s in enumerate(seqs)}


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def assert_parity(model, hf_model, prompts: list[list[int]], decode_steps: int, atol: float) -> None:
    """Prefill (the last prompt in two chunks, its second chunk mixed with the others' decodes),
    then greedy decode steps feeding our argmax; every logits row we produced must equal
    transformers' for the same position. Causality lets one transformers pass per sequence, over
    the final tokens, give the reference for every step."""
    n = len(prompts)
    seqs = [list(p) for p in prompts]
    rows: list[list[torch.Tensor]] = [[] for _ in range(n)]
    paged = PagedBatches(model, n, max(map(len, prompts)) + decode_steps + 1)
    split = len(prompts[-1]) // 2
    chunks = {i: list(p) for i, p in enumerate(prompts)}
    chunks[n - 1] = prompts[-1][:split]
    tail = prompts[-1][split:]
    for _ in range(decode_steps + 2):
        for i, logits in paged.step(model, chunks).items():
            rows[i].append(logits)
        chunks = {}
        for i in range(n):
            if i == n - 1 and tail:
                chunks[i], tail = tail, []
            else:
                tok = int(rows[i][-1][-1].argmax())
                seqs[i].append(tok)
                chunks[i] = [tok]
    for i in range(n):
        ours = torch.cat(rows[i])
        want = hf_logits(hf_model, seqs[i][: ours.shape[0]])
        torch.testing.assert_close(ours, want, atol=atol, rtol=1e-4, msg=lambda m: f"sequence {i}: {m}")
        # the greedy choices we fed back are transformers' choices too
        assert ours[len(prompts[i]) - 1 :].argmax(-1).tolist() == want[len(prompts[i]) - 1 :].argmax(-1).tolist()


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_tiny_model_logits_equal_transformers_through_paged_cache(arch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(arch)
    model, info = load_model(path, device="cpu", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert info.architecture == hf.config.architectures[0]
    assert_parity(model, hf, _prompts(info.vocab_size, [5, 19, 37]), decode_steps=4, atol=1e-4)


def test_smollm2_builtin_logits_equal_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = load_model(smollm2_dir, device="cpu", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    texts = ["What is the capital of France?", "Write a haiku about the sea.", "2+2="]
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True))
        for t in texts
    ]
    assert info.eos_token_ids == [2] and info.max_model_len == 8192
    assert_parity(model, hf, prompts, decode_steps=3, atol=1e-4)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel") as err:
        load_model(tmp_path, load_format="dummy")
    assert "LlamaForCausalLM" in str(err.value)  # names what is supported
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_hf_config(tmp_path)


def test_sharded_safetensors_load_the_same_model(tiny_model_dir, smollm2_dir, tmp_path):
    sharded = make_tiny_model("llama", tmp_path / "sharded", smollm2_dir, max_shard_size="4MB")
    assert len(list(sharded.glob("*.safetensors"))) >= 2
    assert (sharded / "model.safetensors.index.json").is_file()
    one, _ = load_model(tiny_model_dir("llama"), dtype="float32")
    many, _ = load_model(sharded, dtype="float32")
    for (name, a), (_, b) in zip(one.named_parameters(), many.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_missing_weight_is_reported(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_model_dir("qwen3")
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.1.qkv_proj.weight"):
        load_model(dst, dtype="float32")


@pytest.mark.parametrize("shape", list(DUMMY_SHAPES))
def test_dummy_weights_for_benchmark_shapes(shape):
    full = dummy_config(shape)
    real = DUMMY_SHAPES[shape]
    assert (full.hidden_size, full.num_attention_heads, full.num_key_value_heads) == (
        real["hidden_size"], real["num_attention_heads"], real["num_key_value_heads"])
    # real layer shapes, but one layer and a small vocabulary: no 8B allocation in a test
    small = dummy_config(shape, num_hidden_layers=1, vocab_size=512)
    model, info = load_model(small, load_format="dummy", dtype="float32", seed=1)
    assert info.num_layers == 1 and info.head_dim == real["head_dim"]
    paged = PagedBatches(model, 1, 8)
    logits = paged.step(model, {0: [5, 6, 7, 8]})[0]
    assert logits.shape == (4, 512) and torch.isfinite(logits).all()


def test_dummy_weights_are_seeded_and_accept_a_config_dict():
    data = {**DUMMY_SHAPES["smollm2-135m"], "num_hidden_layers": 1, "vocab_size": 256}
    model, info = load_model(data, load_format="dummy", seed=3)
    again, _ = load_model(data, load_format="dummy", seed=3)
    other, _ = load_model(data, load_format="dummy", seed=4)
    assert info.architecture == "LlamaForCausalLM" and info.vocab_size == 256
    assert torch.equal(model.layers[0].qkv_proj.weight, again.layers[0].qkv_proj.weight)
    assert not torch.equal(model.layers[0].qkv_proj.weight, other.layers[0].qkv_proj.weight)
    assert float(model.layers[0].qkv_proj.weight.std()) == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="needs a model directory"):
        load_model(data, load_format="safetensors")


def test_resolve_model_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="`tokenmill fetch no-such-model`"):
        resolve_model("no-such-model", tmp_path)
    with pytest.raises(ValueError, match="no model directory at"):
        resolve_model(tmp_path / "missing" / "model", tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(tmp_path, tmp_path)


def test_model_info_merges_generation_config_eos(tiny_model_dir, tmp_path):
    src = tiny_model_dir("mistral")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    _, info = load_model(dst, load_format="dummy")
    assert info.eos_token_ids == [7, 2]
    assert info.max_model_len == 512  # sliding window 4096 is longer than the context
    assert (info.num_heads, info.num_kv_heads, info.head_dim) == (4, 1, 16)
