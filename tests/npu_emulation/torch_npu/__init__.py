"""A TEST-ONLY EMULATION of Huawei's `torch_npu`: NOT Ascend hardware, NOT its kernels.

Each op here is plain torch on CPU written from the op's DOCUMENTED semantics: same name, argument names, defaults
and returned tuple layout as op-plugin's `op_plugin/config/op_plugin_functions.yaml` and
`docs/zh/custom_APIs/torch_npu/*.md` (Ascend/op-plugin @517f2e7d), plus the argument checks those docs state that our
calls could get wrong (index dtypes, layouts, contiguity, cumulative vs per-sequence lengths). Features we do not
call raise NotImplementedError instead of guessing. Tests that use it check shardserve's call plumbing against our
reading of the docs; they cannot find a misreading shared by the emulation and the caller, nor anything about
Ascend numerics, performance or undocumented hardware limits. Input dtypes are NOT restricted as on hardware
(fused attention and dynamic quant take only fp16/bf16 there; the emulation also accepts fp32 for fp32 tests).

Installed only by tests: `tests/workers/device/conftest.py` puts `tests/npu_emulation` first on sys.path, and Ray
workers get it through `runtime_env={"env_vars": {"PYTHONPATH": ...}}`. Importing it attaches the `torch.npu`
shim as real torch_npu does. `EMULATED = True` is the one flag production code may read: shardserve's npu backend
then keeps tensors on CPU and uses gloo instead of HCCL.
"""

import torch

from torch_npu import npu
from torch_npu._attention import npu_fused_infer_attention_score, npu_scatter_pa_kv_cache
from torch_npu._layers import (
    npu_add_rms_norm,
    npu_apply_rotary_pos_emb,
    npu_rms_norm,
    npu_rotary_mul,
    npu_swiglu,
)
from torch_npu._moe import npu_grouped_matmul, npu_moe_finalize_routing, npu_moe_init_routing_v2
from torch_npu._quant import (
    float8_e8m0fnu,
    npu_convert_weight_to_int4pack,
    npu_dynamic_mx_quant,
    npu_dynamic_quant,
    npu_quant_matmul,
    npu_quantize,
    npu_weight_quant_batchmatmul,
)

EMULATED = True

torch.npu = npu  # real torch_npu registers torch.npu on import the same way

__all__ = [
    "EMULATED",
    "float8_e8m0fnu",
    "npu",
    "npu_add_rms_norm",
    "npu_apply_rotary_pos_emb",
    "npu_convert_weight_to_int4pack",
    "npu_dynamic_mx_quant",
    "npu_dynamic_quant",
    "npu_fused_infer_attention_score",
    "npu_grouped_matmul",
    "npu_moe_finalize_routing",
    "npu_moe_init_routing_v2",
    "npu_quant_matmul",
    "npu_quantize",
    "npu_rms_norm",
    "npu_rotary_mul",
    "npu_scatter_pa_kv_cache",
    "npu_swiglu",
    "npu_weight_quant_batchmatmul",
]
