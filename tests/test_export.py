"""AOTInductor round trip: export → load → generate gives the eager tokens."""

from __future__ import annotations

import zipfile

import pytest
import torch
import user_policy  # noqa: F401  (registers a user's own policy, "decayed")
import user_storage  # noqa: F401  (registers a user's own storage, "tally")
from helpers import kv_model, prompts

import kvslim_fx
from kvslim_fx import KVSlimError


# Batch 1 matters: AOTInductor on torch 2.13 dropped a one-token step's writes to mutated
# *constants* at batch 1, which is why the package takes the cache as mutated inputs.
@pytest.fixture(
    scope="module",
    # The ring layout by full, over the lorc storage (latents and bases); "decayed" is a user's
    # own policy (tests/user_policy.py) over a user's own storage with state shared by layers
    # (tests/user_storage.py), keys kept before RoPE; WeightedKV (its folds, a staged decode
    # token) over the int8 storage, with int8 weights.
    params=[
        ("full", None, 1, "lorc", {}),
        ("kvslimmer", 48, 2, "dense", {"sink": 4, "recent": 4}),
        ("weightedkv", 40, 1, "int8", {"weights": "int8"}),
        ("decayed", 40, 2, "tally:pre_rope=true", {}),
    ],
    ids=lambda p: p[0] if p[3] == "dense" else f"{p[0]}-{p[3].split(':')[0]}",
)
def package(request, tmp_path_factory):
    method, budget, batch, storage, options = request.param
    model = kv_model("llama", method, budget, chunk_size=32, storage=storage, **options)
    path = tmp_path_factory.mktemp("pkg") / f"{method}.pt2"
    kvslim_fx.export(model, path, batch_size=batch, max_length=160)
    return model, path, batch


@pytest.mark.slow
def test_package_generates_the_eager_tokens(package):
    model, path, batch = package
    ids, mask = prompts(batch, 70, [0, 9][:batch], seed=7)
    eager = kvslim_fx.generate(model, ids, mask, max_new_tokens=30, eos_token_id=[])
    runner = kvslim_fx.load(path)
    assert runner.meta["method"] == model.method.name
    assert runner.meta["storage"] == model.layers[0].storage.name
    assert runner.meta["storage_options"] == model.layers[0].storage.options()
    groups = {id(layer.storage.shared) for layer in model.layers if layer.storage.shared}
    assert sum(name.endswith(".shared.stored") for name in runner.state) == len(groups)
    assert runner.meta["vocab_size"] == 128  # the runner refuses ids outside its embedding
    model.reset(batch_size=batch, max_length=160)
    assert runner.meta["cache_bytes"] == model.cache_bytes()
    first = runner.generate(ids, mask, max_new_tokens=30, eos_token_id=[])
    again = runner.generate(ids, mask, max_new_tokens=30, eos_token_id=[])  # reset works
    assert torch.equal(first, eager)
    assert torch.equal(again, eager)


@pytest.mark.slow
def test_package_holds_both_programs_and_the_weights_once(package):
    model, path, _ = package
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        weights = sum(i.file_size for i in archive.infolist() if "/data/weights/" in i.filename)
    programs = {n.split("/aotinductor/")[1].split("/")[0] for n in names if "/aotinductor/" in n}
    assert programs == {"step", "decode"}
    # The model's constants: parameters, and buffers other than the cache (int8 weights' codes
    # and scales, LoRC's bases).
    state = {id(t) for t, _ in model.state().values()}
    constants = [
        *model.graph.parameters(),
        *(b for b in model.graph.buffers() if id(b) not in state),
    ]
    size = sum(t.numel() * t.element_size() for t in constants)
    # Each weight tensor is pickled once (a small header each), not once per program.
    assert size <= weights <= 1.25 * size + 2048 * len(constants)


def test_package_path_must_end_in_pt2(tmp_path):
    with pytest.raises(KVSlimError, match=r"ends in \.pt2"):
        kvslim_fx.export(kv_model("llama"), tmp_path / "model.bin")


@pytest.mark.slow
def test_package_refuses_other_shapes(package):
    _, path, batch = package
    runner = kvslim_fx.load(path)
    ids, mask = prompts(3, 10)
    with pytest.raises(KVSlimError, match=f"batch size {batch}"):
        runner.generate(ids, mask, max_new_tokens=2)
    ids, mask = prompts(batch, 10)
    with pytest.raises(KVSlimError, match="logits_to_keep"):
        runner(ids, mask, logits_to_keep=-1)
    if runner.meta["capacity"]:
        ids, mask = prompts(batch, 150)
        with pytest.raises(KVSlimError, match="holds"):
            runner.generate(ids, mask, max_new_tokens=50)


@pytest.mark.slow
def test_corrupt_package_is_refused(package, tmp_path):
    _, path, _ = package
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = tmp_path / "flipped.pt2"
    middle = len(data) // 2
    flipped.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    for bad in (truncated, flipped):
        with pytest.raises(KVSlimError, match=r"corrupt|not an AOTInductor package|could not be"):
            kvslim_fx.load(bad)


def test_non_packages_are_refused(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(KVSlimError, match="not an AOTInductor package"):
        kvslim_fx.load(junk)
    with pytest.raises(KVSlimError, match="no package"):
        kvslim_fx.load(tmp_path / "missing.pt2")
