"""Streamed LoRA merge (llm2clip/lora_merge.py) == peft's merge_and_unload, in the base's dtype, sharded."""
import json

import pytest
import torch


def _base_and_adapter(tmp_path, dtype):
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(str(tmp_path / "base"))
    m = get_peft_model(tf.AutoModel.from_pretrained(str(tmp_path / "base"), dtype=dtype),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero: make the delta non-trivial
    m.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "base", tmp_path / "adapter"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_merge_equals_peft(tmp_path, dtype):
    from peft import PeftModel
    from transformers import AutoModel

    from llm2clip.lora_merge import INDEX, write_merged

    base, adapter = _base_and_adapter(tmp_path, dtype)
    info = write_merged(base, [adapter], tmp_path / "out", {"is_causal": False}, max_shard_bytes=60_000)
    assert info["shards"] > 1 and info["merged"] == 6 and (tmp_path / "out" / INDEX).is_file()
    assert json.loads((tmp_path / "out/config.json").read_text())["is_causal"] is False
    got = AutoModel.from_pretrained(str(tmp_path / "out"), dtype=dtype).state_dict()
    want = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base), dtype=dtype),
                                     str(adapter)).merge_and_unload().state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == dtype, k  # merged in the base's dtype, no fp32 copy written
        tol = 0 if dtype == torch.float32 else 1e-2
        assert torch.allclose(got[k].float(), want[k].float(), atol=tol, rtol=0), k


def test_adapter_for_another_model_is_an_error(tmp_path):
    from llm2clip.lora_merge import MergeError, write_merged

    base, adapter = _base_and_adapter(tmp_path, torch.float32)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="plain LoRA"):
        write_merged(base, [adapter], tmp_path / "out")
