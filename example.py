"""Generate with nano-vLLM.

With no argument it builds a tiny random Qwen3 checkpoint locally (no download), so the output is gibberish but
every part of the engine runs. Give a local directory or a Hugging Face id (e.g. Qwen/Qwen3-0.6B) for real text.
"""
import argparse
import logging
import tempfile

from nanovllm import LLM, SamplingParams
from nanovllm.testing import build_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", help="checkpoint directory or hub id (default: a tiny local model)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model = args.model or build_checkpoint(tempfile.mkdtemp(prefix="nanovllm-tiny-"), "Qwen3ForCausalLM")
    llm = LLM(model, device=args.device, enforce_eager=args.device == "cpu")
    params = SamplingParams(temperature=0.6, max_tokens=64)
    prompts = ["introduce yourself", "list all prime numbers within 100"]
    prompts = [
        llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    for prompt, output in zip(prompts, llm.generate(prompts, params)):
        print(f"\nPrompt: {prompt!r}\nCompletion: {output.text!r}")


if __name__ == "__main__":
    main()
