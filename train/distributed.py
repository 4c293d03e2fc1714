"""Multi-process (multi-host) start-up: ``jax.distributed.initialize`` when launched as several processes.

Launch N processes with the same config and ``--coordinator HOST:PORT --num-processes N --process-id I`` (or the
environment variables ``FINCH_COORDINATOR``, ``FINCH_NUM_PROCESSES``, ``FINCH_PROCESS_ID``). On clusters where JAX
detects the topology itself (Cloud TPU, SLURM, ...) pass ``--distributed auto`` (or ``FINCH_DISTRIBUTED=auto``).
On CPU the cross-process collectives use gloo. Every process computes the same global batch order and feeds only the
rows its own devices hold (:func:`train.data.local_rows`).
"""

from __future__ import annotations

import argparse
import os

import jax

__all__ = ["add_distributed_args", "initialize_from_args", "maybe_initialize"]

_initialized = False


def maybe_initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    local_device_count: int | None = None,
) -> bool:
    """Initializes the JAX distributed runtime if more than one process is requested; returns whether it did.

    Must run before anything touches a JAX device. Idempotent.
    """
    global _initialized
    if _initialized:
        return True
    coordinator = coordinator or os.environ.get("FINCH_COORDINATOR") or None
    if num_processes is None and os.environ.get("FINCH_NUM_PROCESSES"):
        num_processes = int(os.environ["FINCH_NUM_PROCESSES"])
    if process_id is None and os.environ.get("FINCH_PROCESS_ID"):
        process_id = int(os.environ["FINCH_PROCESS_ID"])
    auto = auto or os.environ.get("FINCH_DISTRIBUTED", "") == "auto"
    if auto:
        jax.distributed.initialize()
        _initialized = True
        return True
    if not num_processes or num_processes <= 1:
        return False
    if coordinator is None or process_id is None:
        raise ValueError(
            f"multi-process run with num_processes={num_processes} needs --coordinator HOST:PORT and --process-id"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is outside [0, {num_processes})")
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms in ("", "cpu"):
        # Cross-process all-reduces between CPU devices need a collectives backend; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if local_device_count is not None:
        kwargs["local_device_ids"] = list(range(local_device_count))
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id, **kwargs
    )
    _initialized = True
    return True


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process")
    group.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process runs)")
    group.add_argument("--num-processes", type=int, default=None, help="total number of processes")
    group.add_argument("--process-id", type=int, default=None, help="this process's index")
    group.add_argument(
        "--distributed",
        choices=["off", "auto"],
        default="off",
        help="auto: let JAX detect the cluster (TPU pods, SLURM)",
    )


def initialize_from_args(args: argparse.Namespace) -> bool:
    return maybe_initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed == "auto")
