"""The peer: Hugging Face transformers' own continuous batching on the same workload.

Used by ``nanovllm bench throughput --compare-hf``. The model is built from the same config with random weights
(as our dummy load format), in the same dtype, with the ``paged|sdpa`` attention; each request gets its own
``max_new_tokens``. Output tokens are counted from what it actually returned; a run that returns fewer than were
asked for (its generation loop logs an error and ends every request early) raises instead of giving a figure.
cuDNN's attention is turned off for the run: on an H100 it failed inside HF's paged SDPA path.
"""
from __future__ import annotations

import time

import torch


def run_hf_continuous_batching(
    model_path: str, prompts: list[list[int]], max_tokens: list[int], temperature: float, device: str
) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_path)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(config, attn_implementation="paged|sdpa", dtype=dtype).to(device).eval()
    generation_config = GenerationConfig(
        max_new_tokens=max(max_tokens), do_sample=temperature > 0, temperature=temperature or None,
        eos_token_id=None, pad_token_id=0,  # like ignore_eos: every request runs to its own max_new_tokens
    )

    def run(batch_prompts: list[list[int]], batch_max_tokens: list[int]) -> list[list[int]]:
        manager = model.init_continuous_batching(generation_config=generation_config)
        manager.start()
        try:
            for i, (prompt, n) in enumerate(zip(batch_prompts, batch_max_tokens)):
                manager.add_request(input_ids=prompt, request_id=f"r{i}", max_new_tokens=n)
            results: dict[str, list[int]] = {}
            while len(results) < len(batch_prompts):
                result = manager.get_result(timeout=600)
                if result is not None and result.is_finished():
                    results[result.request_id] = list(result.generated_tokens)
        finally:
            manager.stop(block=True)
        return [results[f"r{i}"] for i in range(len(batch_prompts))]

    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        run([[1, 2, 3, 4]], [16])  # warm-up, as for our engine
        start = time.perf_counter()
        outputs = run(prompts, max_tokens)
        elapsed = time.perf_counter() - start
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
    # the model's memory goes with this frame; the caller empties the allocator's cache
    output_tokens = sum(len(o) for o in outputs)
    if output_tokens < sum(max_tokens):
        raise RuntimeError(f"HF continuous batching returned {output_tokens} of the {sum(max_tokens)} tokens asked "
                           "for (its generation loop failed; see its log)")
    return {"elapsed_s": elapsed, "output_tokens": output_tokens, "output_tok_per_s": output_tokens / elapsed}
