"""The live shared adapter served merged into the model's weights; every other model as a LoRA on top.

On a CPU, vLLM's LoRA path costs most of the tokens/s (bench/results/serving_bench.md), and most chats
use the shared adapter. So the shared version that is live is folded into a copy of the base model's
weights (`merge_checkpoint`, data/merged/<name>/), and the running vLLM loads that copy in place
(`ModelClient.reload_weights`: vLLM's `reload_weights` through its dev-mode `/collective_rpc`, about half
a second, requests in flight go on). Chats on the shared adapter then take the plain, fast path.

Every other model a request may name stays a LoRA, on top of the merged weights: a user's personal
adapter, a candidate under test, an older version, the base model itself. Each is trained (and kept) as
a LoRA on the *base* model, so what the server loads for it is the difference to the merged one
(`difference_adapter`: the LoRA for X minus the LoRA merged in, exactly, as one LoRA of the two ranks
added; the base model is the merged LoRA negated). `ServedNames` says which vLLM name serves which
model: callers keep naming models as before (chatfb-base = the base model, chatfb-v0003, ...) and the
ModelClient sends each request to the name that serves it (chatfb.serving.model_client).

The merge and the difference are exact in float32; vLLM computes in its serving dtype, so the merged
model's answers match the LoRA-served ones as closely as two bf16 computations of one model do.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_WEIGHTS = "adapter_model.safetensors"


class MergeError(RuntimeError):
    """An adapter that cannot be merged or differenced; str(e) is safe for the admin view."""


def read_lora(folder: Path) -> tuple[dict, dict[str, tuple]]:
    """(adapter_config, {module: (A, scale * B)}) of a PEFT LoRA folder, as float32 tensors. Module names
    are the base model's (model.layers.0.self_attn.q_proj)."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        weights = load_file(folder / _WEIGHTS)
    except (OSError, ValueError) as e:
        raise MergeError(f"{folder.name}: unreadable adapter ({type(e).__name__})") from None
    if config.get("use_dora") or config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise MergeError(f"{folder.name}: only plain LoRA adapters can be merged")
    if config.get("rank_pattern") or config.get("alpha_pattern"):  # chatfb trains one rank and alpha for all
        raise MergeError(f"{folder.name}: adapters with per-module ranks or alphas cannot be merged")
    parts: dict[str, dict] = {}
    for key, tensor in weights.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise MergeError(f"{folder.name}: unexpected weight {key}")
        module, part = key.split(".lora_", 1)
        module = module.removeprefix("base_model.model.")
        parts.setdefault(module, {})[part[0]] = tensor.to(torch.float32)
    modules = {}
    r = config["r"]
    scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
    for module, ab in parts.items():
        rank = ab["A"].shape[0]
        if rank != r:
            raise MergeError(f"{folder.name}: {module} has rank {rank}, its config says {r}")
        modules[module] = (ab["A"], scale * ab["B"])
    return config, modules


def merge_checkpoint(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write the base model's weights with the LoRA at `adapter_dir` added (W + scale * B @ A, in float32,
    stored in each tensor's own dtype) to `out_dir` (the safetensors files only: vLLM reloads weights from
    it; config and tokenizer stay the base model's). Reuses a complete `out_dir`; shard by shard in memory."""
    out_dir = Path(out_dir)
    shards = sorted(Path(base_dir).glob("*.safetensors"))
    if not shards:
        raise MergeError("the base model has no safetensors weights to merge into")
    # what it was made from: the same adapter on the same base weights (another CHATFB_MODEL rebuilds it)
    origin = {"adapter": Path(adapter_dir).name, "base": str(Path(base_dir).resolve()),
              "shards": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in shards]}
    try:
        if json.loads((out_dir / "MERGED").read_text()) == origin:
            return out_dir
    except (OSError, ValueError):
        pass
    _, modules = read_lora(adapter_dir)
    try:
        return _write_merged(shards, modules, Path(base_dir), out_dir, origin)
    except OSError as e:  # e.g. a full disk: the message, never a path
        raise MergeError(f"the merged weights could not be written ({type(e).__name__}: {e.strerror or 'I/O error'})") from None


def _write_merged(shards: list[Path], modules: dict, base_dir: Path, out_dir: Path, origin: dict) -> Path:
    """Write into a folder of its own (two processes may build the same one), then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        todo = {f"{m}.weight": m for m in modules}
        for shard in shards:
            _merge_shard(shard, modules, todo, partial / shard.name)
        if todo:
            raise MergeError(f"the adapter changes {len(todo)} weight(s) the base model does not have, "
                             f"e.g. {next(iter(todo))}")
        for index in base_dir.glob("*.safetensors.index.json"):
            shutil.copy(index, partial / index.name)
        (partial / "MERGED").write_text(json.dumps(origin))
        shutil.rmtree(out_dir, ignore_errors=True)
        partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already when it was renamed
    return out_dir


def _merge_shard(shard: Path, modules: dict, todo: dict, out: Path) -> None:
    """One safetensors file with W + scale * B @ A for the weights the adapter changes (computed in float32,
    stored in each tensor's own dtype); the others as they are."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(shard, "pt") as fh:
        metadata = fh.metadata() or {"format": "pt"}
        for key in fh.keys():
            t = fh.get_tensor(key)
            if key in todo:
                a, b = modules[todo.pop(key)]
                t = (t.to(torch.float32) + b @ a).to(t.dtype)
            tensors[key] = t.contiguous()
    save_file(tensors, out, metadata=metadata)


def difference_adapter(adapter_dir: Path | None, minus_dir: Path, out_dir: Path) -> Path:
    """Write a LoRA equal to the one at `adapter_dir` minus the one at `minus_dir` (None: minus it alone,
    i.e. the base model on weights that have `minus_dir` merged in): A = [A_x; A_m], B = [s_x B_x, -s_m B_m],
    rank r_x + r_m, scale 1. Reuses a complete `out_dir`."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if (out_dir / _WEIGHTS).exists() and (out_dir / "adapter_config.json").exists():
        return out_dir
    minus_config, minus = read_lora(minus_dir)
    config, plus = read_lora(adapter_dir) if adapter_dir is not None else (minus_config, {})
    r_plus = config["r"] if adapter_dir is not None else 0
    r_minus = minus_config["r"]
    rank = r_plus + r_minus
    weights = {}
    for module in sorted(set(plus) | set(minus)):
        some = plus.get(module) or minus.get(module)
        a_shape, b_shape = some[0].shape[1], some[1].shape[0]
        a, b = torch.zeros(rank, a_shape), torch.zeros(b_shape, rank)
        if module in plus:
            a[:r_plus], b[:, :r_plus] = plus[module]
        if module in minus:
            a[r_plus:], b[:, r_plus:] = minus[module][0], -minus[module][1]
        weights[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        weights[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    targets = sorted({m.rsplit(".", 1)[-1] for m in set(plus) | set(minus)})
    out = dict(config, r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
               target_modules=targets, lora_dropout=0.0)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
        try:
            save_file(weights, partial / _WEIGHTS, metadata={"format": "pt"})
            (partial / "adapter_config.json").write_text(json.dumps(out, indent=2))
            try:
                partial.rename(out_dir)
            except OSError:  # another process built it meanwhile: theirs is the same
                if not (out_dir / _WEIGHTS).exists():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    except OSError as e:
        raise MergeError(f"the difference adapter could not be written ({type(e).__name__}: {e.strerror or 'I/O error'})") from None
    return out_dir


@dataclass(frozen=True)
class ServedNames:
    """Which vLLM model name serves each model while the shared adapter `merged` is folded into the server's
    weights (None: nothing is; every model is served under its own name). `base_name` is the server's own
    model name; `adapters` the folder of trained adapters; `served_dir` where difference adapters are kept."""

    base_name: str
    merged: str | None = None
    adapters: Path | None = None
    served_dir: Path | None = None

    def served(self, name: str) -> str:
        if self.merged is None:
            return name
        if name == self.merged:
            return self.base_name
        return f"{name}@{self.merged}"

    def files(self, name: str, path: str | Path) -> str:
        """The folder vLLM loads for model `name` whose own LoRA is at `path`: that LoRA, or on merged
        weights its difference to the merged one (built on first use)."""
        if self.merged is None:
            return str(path)
        if self.adapters is None or self.served_dir is None:
            raise MergeError("no adapter folder to build a difference adapter in")
        own = None if name == self.base_name else Path(path)
        return str(difference_adapter(own, self.adapters / self.merged, self.served_dir / self.served(name)).resolve())
