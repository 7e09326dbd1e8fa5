"""``python -m nanovllm.entrypoints.worker [COMMAND ...]``: one command line for every rank of a multi-host engine.

Started by torchrun (or by hand) with ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
set. Rank 0 runs COMMAND as a ``nanovllm`` command (``serve MODEL -tp 4 -pp 2``), which builds the engine and
drives the others; every other rank joins it as a worker and needs no arguments (the config comes from rank 0).
"""
from __future__ import annotations

import logging
import os
import sys

from nanovllm.distributed.groups import torchrun_env


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    env = torchrun_env()
    if env is None:
        raise SystemExit("set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE (> 1) and LOCAL_RANK, as torchrun does")
    if env.rank == 0:
        if not argv:
            raise SystemExit("rank 0 runs the engine: give it a nanovllm command (e.g. `serve MODEL -tp 2`), "
                             "or run that command directly")
        from nanovllm.entrypoints.cli import main as cli_main

        cli_main(argv)
        return
    from nanovllm.executor.worker import run_worker

    logging.basicConfig(level=os.environ.get("NANOVLLM_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s [rank {env.rank}] %(name)s: %(message)s")
    run_worker(env.rank, env.local_rank, env.master_addr, env.master_port, env.world_size)


if __name__ == "__main__":
    main()
