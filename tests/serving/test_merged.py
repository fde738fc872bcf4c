"""The live shared adapter merged into the weights, every other model a LoRA difference on top
(chatfb.serving.merged; the registry's merged activation in chatfb.serving.adapters)."""

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatfb.serving.adapters import AdapterError, AdapterRegistry, AdapterRouter
from chatfb.serving.merged import MergeError, ServedNames, difference_adapter, merge_checkpoint, read_lora
from chatfb.serving.model_client import ModelClient, ModelError

SHAPES = {"model.layers.0.self_attn.q_proj": (6, 4), "model.layers.0.mlp.down_proj": (4, 5),
          "model.layers.1.self_attn.q_proj": (6, 4)}


def make_base(folder: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {f"{m}.weight": torch.randn(*shape, generator=g) for m, shape in SHAPES.items()}
    weights["model.norm.weight"] = torch.ones(4)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4, "num_hidden_layers": 2}))
    return folder


def make_lora(folder: Path, seed: int, rank: int = 2, alpha: int = 4, modules=None, rslora: bool = False) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {}
    for m in modules or SHAPES:
        out, inp = SHAPES[m]
        weights[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, inp, generator=g)
        weights[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules or SHAPES})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": targets,
         "bias": "none", "modules_to_save": None}))
    return folder


def effective(base: Path, adapters: list[Path]) -> dict:
    """Each module's weight as a server computes it: the base weights plus each LoRA's scale * B @ A."""
    w = load_file(base / "model.safetensors")
    out = {m: w[f"{m}.weight"].clone() for m in SHAPES}
    for folder in adapters:
        for m, (a, b) in read_lora(folder)[1].items():
            out[m] += b @ a
    return out


def close(x: dict, y: dict) -> bool:
    return all(torch.allclose(x[m], y[m], atol=1e-5) for m in SHAPES)


def test_merged_weights_equal_the_lora_and_differences_give_back_every_other_model(tmp_path):
    base = make_base(tmp_path / "base")
    shared = make_lora(tmp_path / "shared", 1)
    personal = make_lora(tmp_path / "personal", 2, rank=2, alpha=8, rslora=True)  # another scale
    partial = make_lora(tmp_path / "partial", 3, modules=["model.layers.0.mlp.down_proj"])  # fewer modules
    merged = merge_checkpoint(base, shared, tmp_path / "merged" / "shared")
    assert (merged / "MERGED").exists() and not (tmp_path / "merged" / "shared.partial").exists()
    assert close(effective(merged, []), effective(base, [shared]))
    assert torch.equal(load_file(merged / "model.safetensors")["model.norm.weight"], torch.ones(4))  # untouched
    for other in (personal, partial):
        diff = difference_adapter(other, shared, tmp_path / "served" / f"{other.name}@shared")
        config = json.loads((diff / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == 4 and not config["use_rslora"]
        # on the merged weights the difference serves exactly the model the LoRA made on the base
        assert close(effective(merged, [diff]), effective(base, [other])), other.name
    base_again = difference_adapter(None, shared, tmp_path / "served" / "base@shared")
    assert close(effective(merged, [base_again]), effective(base, []))
    # and merging is never applied twice: a finished folder is reused
    (merged / "model.safetensors").unlink()
    assert merge_checkpoint(base, shared, merged) == merged and not (merged / "model.safetensors").exists()


def test_an_adapter_for_weights_the_model_lacks_is_refused_and_leaves_nothing(tmp_path):
    base = make_base(tmp_path / "base")
    bad = make_lora(tmp_path / "bad", 1)
    w = load_file(bad / "adapter_model.safetensors")
    w = {k.replace("layers.1.", "layers.7."): v for k, v in w.items()}
    save_file(w, bad / "adapter_model.safetensors")
    with pytest.raises(MergeError, match="does not have"):
        merge_checkpoint(base, bad, tmp_path / "merged" / "bad")
    assert not list((tmp_path / "merged").iterdir())
    (bad / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "use_dora": True}))
    with pytest.raises(MergeError, match="plain LoRA"):
        read_lora(bad)


def test_served_names():
    plain = ServedNames("chatfb-base")
    assert plain.served("chatfb-v0002") == "chatfb-v0002" and plain.files("chatfb-v0002", "/x") == "/x"
    names = ServedNames("chatfb-base", "chatfb-v0002", Path("/a"), Path("/s"))
    assert names.served("chatfb-v0002") == "chatfb-base"
    assert names.served("chatfb-base") == "chatfb-base@chatfb-v0002"
    assert names.served("chatfb-u0123456789-v0001") == "chatfb-u0123456789-v0001@chatfb-v0002"


class ServerClient(ModelClient):
    """The real ModelClient over a fake vLLM: loaded LoRAs by serving name, weight reloads, requests' models."""

    def __init__(self):
        super().__init__("http://127.0.0.1:9")
        self.loaded, self.reloads, self.asked, self.refuse_reload, self.refuse = {}, [], [], False, set()
        create = lambda **body: (self.asked.append(body["model"]), SimpleNamespace(choices=[]))[1]  # noqa: E731
        self._openai = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))

    def models(self):
        return ["chatfb-base", *self.loaded]

    def _call(self, method, url, **kw):
        body = kw.get("json") or {}
        if url == "/v1/load_lora_adapter":
            if body["lora_name"] in self.refuse:
                raise ModelError("The model server refused the request (400): rank 32 > max_lora_rank 16", 400)
            if body["lora_name"] in self.loaded:
                raise ModelError("already loaded", 400)
            self.loaded[body["lora_name"]] = body["lora_path"]
        elif url == "/v1/unload_lora_adapter":
            if self.loaded.pop(body["lora_name"], None) is None:
                raise ModelError("not found", 404)
        elif url == "/collective_rpc":
            if self.refuse_reload:
                raise ModelError("The model server refused the request (404): Not Found", 404)
            self.reloads.append(body["kwargs"]["weights_path"])
        return None


@pytest.fixture
def merging(store, settings, tmp_path):
    base = make_base(tmp_path / "base-model")
    client = ServerClient()
    registry = AdapterRegistry(store, [client], AdapterRouter("chatfb-base"), settings.data_dir, drain_timeout_s=5,
                               base_model_dir=base)
    registry.merging = True
    for i, name in enumerate(["chatfb-v0001", "chatfb-v0002"]):
        make_lora(settings.data_dir / "adapters" / name, 10 + i)
        store.add_adapter(name, None, "candidate", name)
    return registry, client, base


def test_promotion_merges_the_shared_adapter_and_serves_personal_ones_as_differences(merging, store, settings):
    registry, client, base = merging
    data = settings.data_dir
    registry.promote("chatfb-v0001")
    assert client.reloads == [str((data / "merged" / "chatfb-v0001").resolve())], client.reloads
    assert registry.router.current == "chatfb-v0001" and registry.merged == "chatfb-v0001"
    assert store.live_adapter()["name"] == "chatfb-v0001" and client.loaded == {}, "the shared one took a LoRA slot"
    client.complete([{"role": "user", "content": "hi"}], "chatfb-v0001")
    client.complete([{"role": "user", "content": "hi"}], "chatfb-base")
    assert client.asked == ["chatfb-base", "chatfb-base@chatfb-v0001"], "requests went to the wrong serving names"

    owner, personal = "user:ann", "chatfb-u0123456789-v0001"
    make_lora(data / "adapters" / personal, 20)
    store.add_adapter(personal, None, "candidate", personal, owner=owner)
    registry.promote_personal(owner, personal)
    assert sorted(client.loaded) == ["chatfb-base@chatfb-v0001", f"{personal}@chatfb-v0001"]  # base: asked above
    held = registry.router.acquire(owner)  # a reply of ann's still streaming
    registry.promote("chatfb-v0002")
    assert client.reloads[-1] == str((data / "merged" / "chatfb-v0002").resolve())
    assert not (data / "merged" / "chatfb-v0001").exists(), "the old merged weights are kept"
    assert f"{personal}@chatfb-v0002" in client.loaded, "ann's adapter is not ready on the new weights"
    assert f"{personal}@chatfb-v0001" in client.loaded, "unloaded under a running request"
    registry.router.release(held)
    for _ in range(400):  # the old names unload in the background (a busy machine took over 5 s)
        if list(client.loaded) == [f"{personal}@chatfb-v0002"]:
            break
        threading.Event().wait(0.05)
    assert list(client.loaded) == [f"{personal}@chatfb-v0002"], client.loaded
    assert sorted(p.name for p in (data / "served").iterdir()) == [f"{personal}@chatfb-v0002"]

    assert registry.rollback() == "chatfb-v0001"  # merged again, ann's difference rebuilt for it
    assert registry.merged == "chatfb-v0001" and (data / "merged" / "chatfb-v0001" / "MERGED").exists()
    registry.rollback()  # to the base model: its own weights
    assert client.reloads[-1] == str(base.resolve()) and registry.merged is None
    assert registry.router.current == "chatfb-base" and personal in client.loaded, client.loaded
    assert registry.remove_personal(owner) == [personal] and not any((data / "served").glob(f"{personal}@*"))


def test_a_server_that_refuses_the_weights_keeps_serving_what_it_served(merging, store):
    registry, client, _ = merging
    registry.promote("chatfb-v0001")
    client.refuse_reload = True
    with pytest.raises(AdapterError, match="did not take the merged weights"):
        registry.promote("chatfb-v0002")
    assert registry.router.current == "chatfb-v0001" and registry.merged == "chatfb-v0001"
    assert store.live_adapter()["name"] == "chatfb-v0001" and client.names.merged == "chatfb-v0001"


def test_restore_after_a_server_restart_merges_again(merging, store):
    registry, client, _ = merging
    registry.promote("chatfb-v0002")
    client.reloads.clear()
    registry.restore()  # the server came back with the base model's weights
    assert len(client.reloads) == 1 and client.reloads[0].endswith("chatfb-v0002")
    assert registry.router.current == "chatfb-v0002"
    # restarted again, and now the live version cannot be merged: everyone gets the base model, truly
    import shutil
    shutil.rmtree(registry.data_dir / "adapters" / "chatfb-v0002")
    registry.restore()
    client.asked.clear()
    client.complete([{"role": "user", "content": "hi"}], registry.router.acquire())
    assert registry.router.current == "chatfb-base" and registry.merged is None and client.asked == ["chatfb-base"]


def test_a_cycle_child_names_models_as_the_owners_server_serves_them(settings, monkeypatch, store):
    """The owner hands the child what its server has merged (CycleJob.merged); the child's requests follow it."""
    from chatfb.learning import cycle, worker
    from chatfb.serving import model_files

    monkeypatch.setattr(model_files, "resolve_model", lambda model, data_dir: Path("/base"))
    client, _, _ = worker.model_server(settings, "http://127.0.0.1:9", "chatfb-v0003")
    assert client.served("chatfb-v0003") == "chatfb-base" and client.served("chatfb-base") == "chatfb-base@chatfb-v0003"
    assert client.names.served_dir == settings.data_dir / "served"
    plain, _, _ = worker.model_server(settings, "http://127.0.0.1:9", None)
    assert plain.served("chatfb-v0003") == "chatfb-v0003"
    job, work = cycle.prepare_personal(store, settings, "http://127.0.0.1:9", "user:ann", merged="chatfb-v0003")
    assert cycle.read_job(work)[0].merged == "chatfb-v0003"


def test_a_model_nobody_loaded_for_the_merged_weights_is_loaded_on_its_first_request(merging, settings):
    """The base model, an older version: on merged weights each needs its difference LoRA; the first request
    naming it loads it (once), so every caller can keep naming models as before."""
    registry, client, _ = merging
    registry.promote("chatfb-v0002")
    for _ in range(2):
        client.complete([{"role": "user", "content": "hi"}], "chatfb-base")
        client.complete([{"role": "user", "content": "hi"}], "chatfb-v0001")
    assert client.asked == ["chatfb-base@chatfb-v0002", "chatfb-v0001@chatfb-v0002"] * 2
    assert sorted(client.loaded) == ["chatfb-base@chatfb-v0002", "chatfb-v0001@chatfb-v0002"]
    assert (settings.data_dir / "served" / "chatfb-base@chatfb-v0002" / "adapter_model.safetensors").exists()
    client.loaded.clear()  # the server restarted: restore makes new names, so nothing is taken as loaded
    registry.restore()
    client.complete([{"role": "user", "content": "hi"}], "chatfb-base")
    assert "chatfb-base@chatfb-v0002" in client.loaded


def test_no_promotion_by_hand_while_a_cycle_measures_on_the_merged_weights(merging, store):
    from chatfb.app.admin import AdminError, AdminService

    registry, client, _ = merging
    running = SimpleNamespace(training_running=lambda: True)
    admin = AdminService(store, registry, cycles=running)
    for act in (lambda: admin.promote("chatfb-v0001"), admin.rollback):
        with pytest.raises(AdminError, match="learning cycle is running"):
            act()
    assert client.reloads == [] and registry.router.current == "chatfb-base"
    running.training_running = lambda: False
    admin.promote("chatfb-v0001")
    assert registry.merged == "chatfb-v0001"


def test_an_adapter_vllm_refuses_as_a_lora_is_not_merged_either(merging, store):
    """vLLM judges an adapter (its rank, its shapes) before it is merged: every other model is a LoRA difference
    to it, so one it cannot load would break them all."""
    registry, client, _ = merging
    client.refuse.add("chatfb-v0002")
    with pytest.raises(AdapterError, match="refused adapter chatfb-v0002"):
        registry.promote("chatfb-v0002")
    assert client.reloads == [] and registry.merged is None and client.loaded == {}
    registry.promote("chatfb-v0001")  # one it takes: loaded for that moment only, then merged
    assert registry.merged == "chatfb-v0001" and client.loaded == {}
