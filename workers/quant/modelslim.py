"""ModelSlim (msModelSlim, Ascend) checkpoints: detected by quant_model_description.json, a scheme per tensor.

Format: /work/shared/formats-modelslim.md. The description is a flat JSON object: tensor name -> the label of
the Linear owning it (`FLOAT` for what is not quantized), beside a few top-level keys; `model_quant_type` is a
summary only (v1 leaves W4A8_DYNAMIC out of it), so every layer's method comes from its own tensors' labels. Mix-bits
follow: attention, MLP, an MoE layer's w13 (gate/up) and w2 (down) and its shared expert each get their own scheme.
The three producers' layouts load alike: v1 and v0 (`version` "1.0.0": W4A8 weights packed two a byte) and the
older legacy one (no `version`: W4A8 unpacked; norms written twice, as `<norm>.weight` and `<norm>.module.weight`).
The methods, one per scheme, are in modelslim_methods.py.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Hashable

from shardserve.workers.loader import read_config
from shardserve.workers.loader.source import CheckpointError, CheckpointSource
from shardserve.workers.quant.base import LinearMethod, LinearSpec, MoEMethod, MoESpec, QuantConfig, register
from shardserve.workers.quant.modelslim_methods import WEIGHT_KIND, ModelSlimLinearMethod, ModelSlimMoEMethod
from shardserve.workers.quant.unquantized import UnquantizedLinearMethod, UnquantizedMoEMethod

DESCRIPTION = "quant_model_description.json"
TOP_LEVEL = {
    "version", "model_quant_type", "group_size", "metadata", "optional", "kv_cache_type", "kv_quant_type",
    "fa_quant_type", "reduce_quant_type",
}
SERVED = {"FLOAT", *WEIGHT_KIND}
# labels msmodelslim writes (or its source can write) that this build does not serve: refused at load, by name
NOT_SERVED = {
    "W4A4_MXFP4_DUALSCALE": "dual-scale MXFP4", "W16A16S": "sparse float", "W8A8S": "sparse W8A8",
    "W8A8SC": "sparse-compressed W8A8", "W4A16": "W4A16", "NF4": "NF4", "FAQuant": "quantized attention",
    "W8A8_TIMESTEP": "timestep W8A8", "C8": "the int8 KV cache (C8)",
}
NOT_SERVED_SUFFIXES = ("_FLATQUANT", "_FLATQUANT_DYNAMIC", "_SVD", "_SVD_DYNAMIC")


def description_file(model_path: str) -> str | None:
    """The description: quant_model_description.json, or the legacy API's default quant_model_description_<type>.json."""
    if not os.path.isdir(model_path):
        return None
    path = os.path.join(model_path, DESCRIPTION)
    if os.path.isfile(path):
        return path
    legacy = sorted(glob.glob(os.path.join(model_path, "quant_model_description_*.json")))
    if len(legacy) > 1:
        raise CheckpointError(model_path, None, f"several ModelSlim descriptions, one expected: {legacy}")
    return legacy[0] if legacy else None


@register
class ModelSlim(QuantConfig):
    name = "modelslim"

    def __init__(self, path: str, labels: dict[str, str], top: dict):
        self.path, self.labels, self.top = path, labels, top
        self.new_layout = "version" in top  # W4A8 packed two int4 a byte, with scale_bias
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._linear: dict[str, LinearMethod] = {"FLOAT": UnquantizedLinearMethod()}
        self._moe: dict[str, MoEMethod] = {"FLOAT": UnquantizedMoEMethod()}

    @classmethod
    def detect(cls, model_path: str) -> ModelSlim | None:
        path = description_file(model_path)
        if path is None:
            return None
        raw = read_config(path)  # a JSON object, else a CheckpointError naming the file
        top = {k: v for k, v in raw.items() if k in TOP_LEVEL}
        labels = {k: v for k, v in raw.items() if k not in TOP_LEVEL}
        _check_labels(path, labels, top)
        return cls(path, labels, top)

    # ---- the whole checkpoint, before the model is built -------------------------------------------------------
    def bind(self, source: CheckpointSource) -> None:
        """The description and the weight files name the same tensors (msmodelslim writes them so); the legacy
        layout's `.module.` norm copies must equal the norms and are then consumed; shapes are kept for the methods
        (per channel or per group, packed or not)."""
        names = set(source.names())
        described = set(self.labels)
        copies = {n for n in names - described if ".module." in n and n.replace(".module.", ".") in names}
        copies |= {n for n in described & names if ".module." in n and n.replace(".module.", ".") in names}
        absent = sorted(described - names)
        if absent:
            raise CheckpointError(
                self.path, absent[0],
                f"{len(absent)} tensors named in the description are absent from the weight files: {absent[:8]}",
            )
        uncovered = sorted(names - described - copies)
        if uncovered:
            raise CheckpointError(
                source.file_of(uncovered[0]), uncovered[0],
                f"{len(uncovered)} tensors of the weight files are not in {os.path.basename(self.path)}, which must "
                f"label every tensor: {uncovered[:8]}",
            )
        for copy in sorted(copies):
            original = copy.replace(".module.", ".")
            a, b = source.read(copy), source.read(original)
            if a.shape != b.shape or not (a.float() == b.float()).all():
                raise CheckpointError(
                    source.file_of(copy), copy, f"the legacy layout's copy of {original} differs from it"
                )
        self._shapes = {n: tuple(source.shape(n)) for n in names}

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self._shapes.get(name)

    # ---- one method per scheme -------------------------------------------------------------------------------
    def scheme_of(self, module: str) -> Hashable:
        name = f"{module}.weight"
        if name not in self.labels:
            raise CheckpointError(self.path, name, f"not in {os.path.basename(self.path)}: no scheme for {module}")
        return self.labels[name]

    def linear_method(self, spec: LinearSpec) -> LinearMethod:
        scheme = self.uniform_scheme(spec.prefix, spec.sub_prefixes)
        if scheme not in self._linear:
            self._linear[scheme] = ModelSlimLinearMethod(self, scheme)
        return self._linear[scheme]

    def moe_method(self, spec: MoESpec) -> MoEMethod:
        tried = [f"{m}.weight" for m in spec.modules]
        missing = [n for n in tried if n not in self.labels]
        if missing:
            others = sorted(n for n in self.labels if n.startswith(f"{spec.prefix}."))[:6]
            raise CheckpointError(
                self.path, missing[0],
                f"no scheme for {spec.prefix} ({spec.which}): tried the per-expert names "
                f"{spec.prefix}.{{e}}.{{{','.join(spec.sub_names)}}}.weight for e in 0..{spec.num_experts - 1}; "
                f"{len(missing)} absent. Names the description has under {spec.prefix}: {others or 'none'}",
            )
        scheme = self.uniform_scheme(f"{spec.prefix} ({spec.which})", spec.modules)
        if scheme not in self._moe:
            self._moe[scheme] = ModelSlimMoEMethod(self, scheme)
        return self._moe[scheme]


def _check_labels(path: str, labels: dict, top: dict) -> None:
    """Every label known and served, else a CheckpointError naming the tensor and its label; KV-cache and attention
    quantization (top-level keys) and QuaRot rotations are refused by name too."""
    for key in ("kv_cache_type", "kv_quant_type", "fa_quant_type"):
        if top.get(key):
            raise CheckpointError(
                path, key, f"{key} {top[key]!r}: quantized KV cache / attention is not served by this build; "
                f"export without use_kvcache_quant / use_fa_quant",
            )
    if isinstance(top.get("metadata"), dict) and top["metadata"].get("quarot"):
        raise CheckpointError(path, "metadata.quarot", "QuaRot rotations are not served by this build")
    for tensor, label in labels.items():
        if not isinstance(label, str):
            raise CheckpointError(path, tensor, f"label {label!r} is not a string")
        if label in SERVED:
            continue
        if label in NOT_SERVED or label.endswith(NOT_SERVED_SUFFIXES):
            what = NOT_SERVED.get(label, label)
            raise CheckpointError(path, tensor, f"ModelSlim scheme {label!r} ({what}) is not served by this build")
        raise CheckpointError(
            path, tensor, f"unknown ModelSlim scheme label {label!r}; known: {sorted(SERVED | set(NOT_SERVED))}"
        )
