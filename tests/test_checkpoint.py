"""Checkpoint IO: lazy sharded reading, streamed sharded writing, side files, a transformers round trip."""

from __future__ import annotations

import json

import torch
import yaml

from pcbcore.checkpoint import CheckpointReader, ShardedWriter
from pcbcore.config import parse_merge_config
from pcbcore.executor import merge_to_folder
from pcbmerge.cli import main


def test_sharded_writer_streams_row_blocks_into_shards_with_an_index(tmp_path):
    tensors = {"a": torch.arange(12.0).reshape(4, 3), "b": torch.ones(5, dtype=torch.bfloat16), "c": torch.tensor([1, 2], dtype=torch.int64)}
    plan = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=40)
    writer.write("a", tensors["a"][:1])
    writer.write("a", tensors["a"][1:])
    writer.write("b", tensors["b"])
    writer.write("c", tensors["c"])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    reader = CheckpointReader(tmp_path)
    for name, value in tensors.items():
        assert torch.equal(reader.read(name), value)
    assert torch.equal(reader.read("a", rows=(1, 3)), tensors["a"][1:3])


def test_merge_writes_a_folder_transformers_loads(tiny_zoo, tmp_path, device):
    from transformers import AutoModelForCausalLM

    base, models = tiny_zoo
    data = {"merge_method": "pcb", "base_model": str(base), "models": [{"model": str(m)} for m in models], "out_dtype": "bfloat16"}
    config = parse_merge_config(data)
    merge_to_folder(config, tmp_path / "out", device=device, max_shard_bytes=20_000)
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "pcb" in card and str(models[0]) in card
    assert yaml.safe_load((out / "pcbmerge_config.yml").read_text())["merge_method"] == "pcb"
    model = AutoModelForCausalLM.from_pretrained(out)
    merged = CheckpointReader(out)
    for name, param in model.state_dict().items():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, merged.read(name)), name
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_cli_merge_of_a_bf16_zoo_follows_mergekits_op_order(tmp_path):
    """No `dtype` on a bf16 zoo: mergekit merges in the stored bf16, rounding after each op; `compute_dtype:
    float32` opts into float32 maths rounded once."""
    from builders import build_tiny_zoo

    base, models = build_tiny_zoo(tmp_path / "zoo", n_models=2, dtype=torch.bfloat16)
    data = {"merge_method": "task_arithmetic", "base_model": "zoo/base", "models": [{"model": "zoo/ft0"}, {"model": "zoo/ft1"}], "parameters": {"lambda": 0.5}}
    for name_, extra in (("ta", {}), ("precise", {"compute_dtype": "float32"})):
        (tmp_path / f"{name_}.yml").write_text(yaml.safe_dump({**data, **extra}))
        assert main(["merge", str(tmp_path / f"{name_}.yml"), str(tmp_path / name_), "--device", "cpu"]) == 0
    b, m0, m1, out, precise = (CheckpointReader(p) for p in (base, *models, tmp_path / "ta", tmp_path / "precise"))
    differ = 0
    for name in b.tensors:
        theta, first, second = b.read(name), m0.read(name), m1.read(name)
        mixed = torch.stack([first - theta, second - theta]).sum(dim=0)  # bf16 deltas, summed to bf16
        mixed *= 0.5
        assert torch.equal(out.read(name), theta + mixed), name
        expected = theta.float() + 0.5 * ((first.float() - theta.float()) + (second.float() - theta.float()))
        assert torch.equal(precise.read(name), expected.to(torch.bfloat16)), name
        differ += int(not torch.equal(out.read(name), precise.read(name)))
    assert differ > 0  # the two orders do round differently
