"""tokenmill's inference engine: a paged-KV, continuous-batching engine for Llama-family models.

Usable on its own, like a library:

    from engine import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct", device="cpu")  # after `tokenmill fetch smollm2-135m-instruct`
    print(llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))[0].text)
"""

from engine.config import EngineConfig, ModelInfo
from engine.engine import Engine
from engine.llm import LLM
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import TokenLogprob
from engine.sampling_params import SamplingParams
from engine.stats import EngineStats

__all__ = [
    "LLM",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "ModelInfo",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
