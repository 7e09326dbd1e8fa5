"""``python -m nanovllm``: the same CLI as the ``nanovllm`` command."""
from nanovllm.entrypoints.cli import main

if __name__ == "__main__":  # also imported (not run) by spawned engine-core processes
    main()
