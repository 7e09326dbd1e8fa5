"""The loader: GGUF files (every common tensor type, every supported architecture, the tokenizer and chat template
from the file), PyTorch .bin checkpoints, and model names that fail clearly offline."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.gguf_testing import write_gguf
from nanovllm.loader import resolve_model_path
from nanovllm.loader.gguf import DEQUANTIZABLE, iter_tensors, load_config
from nanovllm.testing import build_checkpoint

pytest.importorskip("gguf")

PROMPTS = [[5, 6, 7, 8], list(range(20, 45))]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=256)
# K-quants hold blocks of 256 values: a model whose every row is a multiple of 256 long
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path_factory.getbasetemp() / "nanovllm-cache"))


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_checkpoint(tmp_path_factory.mktemp("wide"), "LlamaForCausalLM", **WIDE)


def reference_tensors(path: str, llama: bool, config) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """What the file holds, dequantized by ``gguf`` itself, under llama.cpp's own names (no loader code)."""
    from gguf import GGUFReader, dequantize

    out = {}
    for tensor in GGUFReader(path).tensors:
        value = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type)))
        if llama and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in tensor.name else config.num_key_value_heads
            half = value.shape[0] // heads // 2  # llama.cpp's rows 2i + j of a head are rows j * half + i
            value = value.reshape(heads, half, 2, -1).transpose(1, 2).reshape(value.shape)
        out[tensor.name] = value
    return out


@pytest.mark.parametrize("kind", DEQUANTIZABLE)
def test_every_tensor_type_loads_as_gguf_dequantizes_it(wide_llama: str, tmp_path: Path, kind: str) -> None:
    path = write_gguf(wide_llama, str(tmp_path / f"model-{kind}.gguf"), kind)
    config = load_config(path)
    expected = reference_tensors(path, llama=True, config=config)
    loaded = dict(iter_tensors(path, config))
    assert len(loaded) == len(expected)
    gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, value in loaded.items():
        if name not in gguf_name:
            _, _, layer, rest = name.split(".", 3)
            part, _, suffix = rest.rpartition(".")
            gguf_name[name] = f"blk.{layer}.{parts[part]}.{suffix}"
        assert torch.equal(value, expected[gguf_name[name]]), name
    # and the engine runs on it
    out = LLM(path, **ENGINE).generate(PROMPTS[0], GREEDY, use_tqdm=False)[0]
    assert len(out.token_ids) == GREEDY.max_tokens


def test_a_float_gguf_holds_the_checkpoint_exactly(wide_llama: str, tmp_path: Path) -> None:
    """The F32 file's weights are the checkpoint's, bit for bit: names, q/k rows and all."""
    from safetensors.torch import load_file

    path = write_gguf(wide_llama, str(tmp_path / "model.gguf"), "F32")
    original = {}
    for file in Path(wide_llama).glob("*.safetensors"):
        original.update(load_file(file))
    loaded = dict(iter_tensors(path, load_config(path)))
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[name], original[name].float()) for name in original)


ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_transformers_on_the_same_file(arch: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    checkpoint = build_checkpoint(tmp_path / "hf", arch)
    path = write_gguf(checkpoint, str(tmp_path / "model.gguf"), "Q8_0")
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    # transformers reads no head size for qwen3 and no expert sizes from a GGUF file: give it those
    overrides = {k: config[k] for k in ("head_dim", "moe_intermediate_size", "shared_expert_intermediate_size",
                                        "norm_topk_prob") if k in config}
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32,
                                              **overrides)
    ours = LLM(path, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, ours):
        with torch.no_grad():
            generated = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                                    min_new_tokens=GREEDY.max_tokens, pad_token_id=0)
        assert out.token_ids == generated[0, len(prompt):].tolist()


def test_tokenizer_and_chat_template_come_from_the_file(qwen3_dir: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = write_gguf(qwen3_dir, str(tmp_path / "model.gguf"), "F16")
    llm = LLM(path, **ENGINE)
    original = AutoTokenizer.from_pretrained(qwen3_dir)
    text = "Hello, world! 123 <|im_start|>user\nhi<|im_end|>"
    assert llm.tokenizer.encode(text) == original.encode(text)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    expected = original.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert out.prompt_token_ids == expected


def test_unsupported_architecture_and_tensor_type_are_named(qwen3_dir: str, tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    path = write_gguf(qwen3_dir, str(tmp_path / "model.gguf"), "F32")
    other = tmp_path / "phi.gguf"
    writer = GGUFWriter(str(other), "phi2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="'phi2'.*not supported"):
        LLM(str(other), **ENGINE)
    odd = tmp_path / "iq.gguf"  # IQ4_NL: 32 values in 18 bytes, a type the loader does not take
    shutil.copy(path, odd)
    writer = GGUFWriter(str(odd), "qwen3")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 18), dtype=np.uint8), raw_dtype=GGMLQuantizationType.IQ4_NL)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    config = load_config(path)
    with pytest.raises(ValueError, match="IQ4_NL, which is not supported"):
        list(iter_tensors(str(odd), config))


def test_a_directory_holding_one_gguf_file_means_that_file(qwen3_dir: str, tmp_path: Path) -> None:
    path = write_gguf(qwen3_dir, str(tmp_path / "model.gguf"), "F32")
    assert resolve_model_path(str(tmp_path)) == path
    write_gguf(qwen3_dir, str(tmp_path / "other.gguf"), "F16")
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("num_shards", [1, 2])
def test_pytorch_bin_checkpoints(qwen3_dir: str, tmp_path: Path, num_shards: int) -> None:
    """pytorch_model.bin (or shards and their index) where a directory has no safetensors: the same tokens."""
    from safetensors.torch import load_file

    state = {}
    for file in Path(qwen3_dir).glob("*.safetensors"):
        state.update(load_file(file))
    target = tmp_path / "bin"
    shutil.copytree(qwen3_dir, target, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    names = sorted(state)
    if num_shards == 1:
        torch.save(state, target / "pytorch_model.bin")
    else:
        weight_map = {}
        for shard, chunk in enumerate(np.array_split(np.array(names), num_shards)):
            file = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
            torch.save({str(name): state[str(name)] for name in chunk}, target / file)
            weight_map.update({str(name): file for name in chunk})
        (target / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (target / "training_args.bin").write_bytes(b"not a checkpoint")  # must not be read as one
    expected = LLM(qwen3_dir, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    got = LLM(str(target), **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]


def test_a_missing_local_path_says_so(tmp_path: Path) -> None:
    for model in (str(tmp_path / "nothing"), "./relative/nothing", str(tmp_path / "model.gguf")):
        with pytest.raises(ValueError, match="does not exist"):
            LLM(model, **ENGINE)


def test_a_hub_id_offline_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ValueError, match="not in the local Hugging Face cache") as info:
        LLM("SomeOrg/some-model", **ENGINE)
    assert "\n" not in str(info.value) and "directory or a .gguf file" in str(info.value)
