"""Experts with added tokens (options.vocab), on real tokenizers and Llama models built here:
refused by default with both row counts and the two policies; ``base`` keeps the base's rows and
names the dropped tokens; ``union`` appends the added tokens' rows, averaged over the experts that
share a token, and the merged model and tokenizer load with transformers and know the tokens."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import merging
from merging.errors import IncompatibleCheckpointsError, InputError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

V = 100
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _tokenizer():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(V - 3)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _save(model, tok, path):
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    torch.manual_seed(0)
    def config():  # a fresh one per model: resizing the embeddings changes the config in place
        return transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(config())
    _save(base, _tokenizer(), root / "base")
    experts = {}
    for name, added in (("chat", ["<|im_start|>", "<|im_end|>"]), ("tools", ["<|im_start|>", "<tool>"])):
        tok = _tokenizer()
        tok.add_tokens(added, special_tokens=True)
        model = transformers.LlamaForCausalLM(config())
        model.load_state_dict(base.state_dict())
        model.resize_token_embeddings(len(tok))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        experts[name] = _save(model, tok, root / name)
    plain = transformers.LlamaForCausalLM(config())  # no added tokens
    plain.load_state_dict(base.state_dict())
    experts["plain"] = _save(plain, _tokenizer(), root / "plain")
    return root


def _spec(root, out, vocab=None, experts=("chat", "tools", "plain")):
    return {"method": "task_arithmetic", "params": {"alpha": 0.5}, "base": {"uri": str(root / "base")},
            "experts": [{"uri": str(root / n), "name": n} for n in experts], "output": {"uri": str(root / out)},
            "options": {"diagnostics": "off", **({"vocab": vocab} if vocab else {})}}


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_added_tokens_are_refused_by_default_naming_both_counts_and_the_options(family):
    with pytest.raises(IncompatibleCheckpointsError) as e:
        merging.merge(_spec(family, "refused"))
    message = str(e.value)
    assert "expert 'chat' has 102 rows, base has 100" in message and "adds 2 token(s)" in message
    assert "'base'" in message and "'union'" in message and e.value.field == "options.vocab"
    assert "lm_head.weight" in message or "model.embed_tokens.weight" in message
    assert not (family / "refused").exists()


def test_vocab_base_keeps_the_base_rows_and_names_the_dropped_tokens(family):
    result = merging.merge(_spec(family, "base-vocab", "base"))
    out, base = _weights(family / "base-vocab"), _weights(family / "base")
    chat, tools, plain = (_weights(family / n) for n in ("chat", "tools", "plain"))
    for key in (EMB, HEAD):
        assert out[key].shape == (V, 32)
        expected = base[key] + 0.5 * sum(e[key][:V] - base[key] for e in (chat, tools, plain))
        assert torch.allclose(out[key], expected, atol=1e-6)
    rows = {r["key"]: r for r in result.manifest["tensors"]}
    assert "expert 'chat': 2 added row(s) 100..102 dropped (options.vocab: base): '<|im_start|>', '<|im_end|>'" in rows[EMB]["note"]
    assert "expert 'tools'" in rows[HEAD]["note"] and "'<tool>'" in rows[HEAD]["note"]
    assert json.loads((family / "base-vocab" / "config.json").read_text())["vocab_size"] == V


def test_vocab_union_appends_shared_tokens_once_and_the_model_loads(family):
    result = merging.merge(_spec(family, "union-vocab", "union"))
    out_dir = family / "union-vocab"
    out, base = _weights(out_dir), _weights(family / "base")
    chat, tools, plain = (_weights(family / n) for n in ("chat", "tools", "plain"))
    for key in (EMB, HEAD):
        assert out[key].shape == (V + 3, 32)
        expected = base[key] + 0.5 * sum(e[key][:V] - base[key] for e in (chat, tools, plain))
        assert torch.allclose(out[key][:V], expected, atol=1e-6)
        assert torch.allclose(out[key][V], (chat[key][V] + tools[key][V]) / 2)  # <|im_start|>: both added it
        assert torch.equal(out[key][V + 1], chat[key][V + 1])  # <|im_end|>
        assert torch.equal(out[key][V + 2], tools[key][V + 1])  # <tool>: tools' row 101, appended third
    rows = {r["key"]: r for r in result.manifest["tensors"]}
    assert rows[EMB]["shape"] == [V + 3, 32]
    assert "3 token(s) appended" in rows[EMB]["note"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir))
    assert model.config.vocab_size == V + 3 and model.get_input_embeddings().weight.shape == (V + 3, 32)
    tok = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    ids = tok("<|im_start|> w5 <tool> <|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [V, 8, V + 2, V + 1]
    assert torch.equal(model.get_input_embeddings().weight[V + 2].detach(), tools[EMB][V + 1])


def test_vocab_union_needs_the_added_rows_named(family, tmp_path):
    """An expert whose tokenizer does not name its added rows cannot be united by token string."""
    import shutil
    odd = tmp_path / "odd"
    shutil.copytree(family / "chat", odd)
    tok = json.loads((odd / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|im_end|>"]
    (odd / "tokenizer.json").write_text(json.dumps(tok))
    spec = _spec(family, "odd-out", "union", experts=("chat",))
    spec["experts"] = [{"uri": str(odd), "name": "odd"}, {"uri": str(family / "tools"), "name": "tools"}]
    with pytest.raises(InputError, match=r"expert 'odd''s tokenizer.json does not name row 101 \(of 102; the base has 100\)"):
        merging.merge(spec)


def test_vocab_union_needs_a_base_tokenizer_to_add_the_tokens_to(family, tmp_path):
    import shutil
    bare = tmp_path / "bare-base"
    shutil.copytree(family / "base", bare)
    (bare / "tokenizer.json").unlink()
    spec = _spec(family, "no-tok", "union")
    spec["base"] = {"uri": str(bare)}
    with pytest.raises(InputError, match=r"options.vocab: 'union' writes the added tokens into the base's tokenizer.json, "
                                         r"and the base \(.*bare-base\) has none") as e:
        merging.merge(spec)
    assert e.value.field == "options.vocab"
