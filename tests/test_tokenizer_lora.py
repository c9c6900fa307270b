"""Vocabularies (`tokenizer_source`, the `tokenizer:` block), `chat_template` and `model+lora` references,
on tiny hand-made checkpoints whose merged values are worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models

from pcbcore.chat_templates import TEMPLATES
from pcbcore.config import parse_merge_config
from pcbcore.errors import MergeInputError
from pcbcore.executor import merge_to_folder
from pcbcore.lora import open_model

HIDDEN = 4
BASE_TOKENS = [f"t{i}" for i in range(6)]
EMBED, HEAD, Q = "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"


def save_model(folder: Path, weights: dict[str, torch.Tensor], added: list[str] = (), template: str | None = None) -> Path:
    """A checkpoint of three tensors, its config.json (vocab_size: the embedding's rows) and a WordLevel
    tokenizer.json over BASE_TOKENS plus `added` tokens."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"vocab_size": weights[EMBED].shape[0], "num_hidden_layers": 1}))
    tokenizer = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(BASE_TOKENS)}, unk_token="t0"))
    tokenizer.add_tokens([AddedToken(t, normalized=True, special=False) for t in added])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template} if template else {}))
    return folder


def weights(seed: int, rows: int = len(BASE_TOKENS)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {EMBED: torch.randn(rows, HIDDEN, generator=g), Q: torch.randn(HIDDEN, HIDDEN, generator=g), HEAD: torch.randn(rows, HIDDEN, generator=g)}


@pytest.fixture
def zoo(tmp_path: Path) -> dict[str, Path]:
    base_w = weights(0)
    ft_w = {k: v + 0.1 for k, v in base_w.items()}
    vocab_w = {k: v - 0.2 for k, v in base_w.items()}
    extra = torch.arange(2 * HIDDEN, dtype=torch.float32).reshape(2, HIDDEN)  # the rows of the two added tokens
    vocab_w[EMBED], vocab_w[HEAD] = torch.cat([vocab_w[EMBED], extra]), torch.cat([vocab_w[HEAD], -extra])
    return {
        "base": save_model(tmp_path / "base", base_w, template="{{ base }}"),
        "ft": save_model(tmp_path / "ft", ft_w, template="{{ shared }}"),
        "vocab": save_model(tmp_path / "vocab", vocab_w, added=["<a>", "<b>"], template="{{ shared }}"),
        "root": tmp_path,
    }


def merge(zoo: dict, extra: dict, method: str = "task_arithmetic", models=("ft", "vocab"), weight: float = 0.5) -> Path:
    data = {
        "merge_method": method,
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo[m]) if m in zoo else m, "parameters": {"weight": weight}} for m in models],
        **extra,
    }
    out = zoo["root"] / "out"
    merge_to_folder(parse_merge_config(data), out, device="cpu", overwrite=True)
    return out


def test_union_vocabulary_appends_the_missing_tokens_and_their_only_rows(zoo):
    out = merge(zoo, {"tokenizer_source": "union"})
    merged, base = load_file(out / "model.safetensors"), load_file(zoo["base"] / "model.safetensors")
    # Rows of the base's tokens: θ_pre + 0.5·(+0.1) + 0.5·(−0.2) = θ_pre − 0.05.
    torch.testing.assert_close(merged[EMBED][:6], base[EMBED] - 0.05)
    # The added tokens: only `vocab` has them, so every model (base included) takes its row; τ = 0 there.
    extra = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    assert torch.equal(merged[EMBED][6:], extra) and torch.equal(merged[HEAD][6:], -extra)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 8
    added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    assert [(e["id"], e["content"]) for e in added] == [(6, "<a>"), (7, "<b>")]


def test_base_vocabulary_drops_the_tokens_the_base_lacks(zoo):
    out = merge(zoo, {"tokenizer_source": "base"})
    merged, base = load_file(out / "model.safetensors"), load_file(zoo["base"] / "model.safetensors")
    assert merged[EMBED].shape == (6, HIDDEN)
    torch.testing.assert_close(merged[HEAD], base[HEAD] - 0.05)


def test_tokens_block_zero_force_model_token_and_padding(zoo):
    tokens = {
        "<a>": {"source": {"kind": "zero"}},
        "t2": {"source": str(zoo["ft"]), "force": True},  # every model takes ft's row of t2
        "<new>": {"source": {"kind": "model_token", "model": str(zoo["base"]), "token": "t1"}},
    }
    out = merge(zoo, {"tokenizer": {"source": "union", "tokens": tokens, "pad_to_multiple_of": 4}})
    merged, base = load_file(out / "model.safetensors"), load_file(zoo["base"] / "model.safetensors")
    ft = load_file(zoo["ft"] / "model.safetensors")
    embed = merged[EMBED]
    assert embed.shape == (12, HIDDEN)  # 9 tokens, padded up to a multiple of 4
    # <a> (not forced): zero in the models that lack it, vocab keeps its own row: 0 + 0.5·(row − 0).
    torch.testing.assert_close(embed[6], 0.5 * torch.arange(4, dtype=torch.float32))
    torch.testing.assert_close(embed[2], ft[EMBED][2])  # t2 forced: the same row everywhere, τ = 0
    torch.testing.assert_close(embed[7], torch.arange(4, 8, dtype=torch.float32))  # <b>: vocab's only row
    torch.testing.assert_close(embed[8], base[EMBED][1])  # <new>: the base's row of t1
    # Padding: each model's mean row; task arithmetic is linear, so the merged padding row is the mean
    # of the merged rows.
    for k in (9, 10, 11):
        torch.testing.assert_close(embed[k], embed[:9].mean(dim=0))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 12
    contents = [e["content"] for e in json.loads((out / "tokenizer.json").read_text())["added_tokens"]]
    assert contents == ["<a>", "<b>", "<new>"]


def test_chat_template_auto_name_and_inline(zoo):
    out = merge(zoo, {"chat_template": "auto"}, models=("ft",))  # the base's and ft's: a tie, the first wins
    assert (out / "chat_template.jinja").read_text() == "{{ base }}"
    out = merge(zoo, {"chat_template": "auto", "tokenizer_source": "union"})  # ft and vocab share one
    assert (out / "chat_template.jinja").read_text() == "{{ shared }}"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "{{ shared }}"
    out = merge(zoo, {"chat_template": "chatml"}, models=("ft",))
    assert (out / "chat_template.jinja").read_text() == TEMPLATES["chatml"]
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = merge(zoo, {"chat_template": inline}, models=("ft",))
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == inline


def save_lora(folder: Path, a: torch.Tensor, b: torch.Tensor, r: int, alpha: float, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj"], **config}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, str(folder / "adapter_model.safetensors"))
    return folder


def test_lora_reference_adds_scaled_b_times_a(zoo):
    a = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]])  # (r, in)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # (out, r)
    lora = save_lora(zoo["root"] / "lora", a, b, r=2, alpha=4)  # s = 4 / 2 = 2
    ref = f"{zoo['base']}+{lora}"
    w = load_file(zoo["base"] / "model.safetensors")[Q]
    expected = w + 2 * torch.tensor([[1.0, 0, 2, 0], [0, 1, 0, -1], [1, 1, 2, -1], [0, 0, 0, 0]])
    reader = open_model(ref)
    torch.testing.assert_close(reader.read(Q), expected)
    torch.testing.assert_close(reader.read(Q, (1, 3)), expected[1:3])  # a block of rows
    assert torch.equal(reader.read(EMBED), load_file(zoo["base"] / "model.safetensors")[EMBED])
    # Through a merge: task arithmetic of the adapted model alone at weight 1 gives the adapted model.
    out = merge(zoo, {}, models=(ref,), weight=1.0)
    torch.testing.assert_close(load_file(out / "model.safetensors")[Q], expected)
    rs = save_lora(zoo["root"] / "rslora", a, b, r=2, alpha=4, use_rslora=True)  # s = 4 / √2
    torch.testing.assert_close(open_model(f"{zoo['base']}+{rs}").read(Q), w + (4 / 2**0.5) * (b @ a))


def test_lora_bad_input_names_the_problem(zoo):
    with pytest.raises(MergeInputError, match=r"key 'models\[0\].model'.*one '\+'"):
        parse_merge_config({"merge_method": "linear", "base_model": "b", "models": [{"model": "a+b+c"}]})
    (zoo["root"] / "empty").mkdir()
    with pytest.raises(MergeInputError, match="has no adapter_config.json"):
        open_model(f"{zoo['base']}+{zoo['root'] / 'empty'}")
    bad = save_lora(zoo["root"] / "bad", torch.zeros(2, 3), torch.zeros(4, 2), r=2, alpha=2)
    with pytest.raises(MergeInputError, match="do not make the model's"):
        open_model(f"{zoo['base']}+{bad}")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, "keys 'tokenizer_source' and 'tokenizer' are exclusive"),
        ({"tokenizer": {"tokens": {"<x>": {"source": "elsewhere"}}}}, r"key 'tokenizer.tokens.<x>.source' names model 'elsewhere'"),
        ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "b"}}}}}, "exactly one of 'token_id' and 'token'"),
        ({"tokenizer": {"pad_to_multiple_of": 0}}, r"key 'tokenizer.pad_to_multiple_of'"),
        ({"chat_template": "zephyr"}, r"key 'chat_template' must be 'auto', one of \['alpaca'"),
    ],
)
def test_vocabulary_and_template_bad_input(extra, match):
    with pytest.raises(MergeInputError, match=match):
        parse_merge_config({"merge_method": "linear", "base_model": "b", "models": [{"model": "a"}], **extra})


def test_a_token_source_lacking_the_token_is_refused_before_writing(zoo):
    with pytest.raises(MergeInputError, match=r"key 'tokenizer.tokens.<a>.source': model '.*ft' has no token '<a>'"):
        merge(zoo, {"tokenizer": {"source": "union", "tokens": {"<a>": {"source": str(zoo["ft"])}}}})
    assert not (zoo["root"] / "out").exists()
