"""shardserve: Ray-based tensor-parallel serving of quantized LLMs."""

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    from shardserve.cluster.llm import LLM, RequestOutput
    from shardserve.router.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy: `import shardserve.workers...` inside a worker process must not import Ray's driver side.
    if name in ("LLM", "RequestOutput"):
        from shardserve.cluster import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from shardserve.router.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'shardserve' has no attribute {name!r}")
