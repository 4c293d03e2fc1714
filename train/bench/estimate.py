"""The up-front duration estimate: from the counted FLOPs and the measured peak, before anything is compiled.

A run whose estimate exceeds ``--max-minutes`` is refused with the options that would shrink it.
"""

from __future__ import annotations

from models import flops as flops_lib
from train.bench.spec import BenchSpec

__all__ = ["estimate_seconds", "shrink_advice"]

# Rough costs (seconds); calibrated on a 2-core Xeon, generous.
_ESTIMATE_EFFICIENCY = 0.45  # assumed fraction of the matmul peak a step reaches
_JAX_COMPILE_BASE_S, _JAX_COMPILE_PER_LAYER_S = 4.0, 1.2
_TORCH_COMPILE_BASE_S, _TORCH_COMPILE_PER_LAYER_S = 45.0, 4.0
_SUBPROCESS_START_S = 10.0


def estimate_seconds(
    spec: BenchSpec, shape: flops_lib.TransformerShape, peak_flops_per_s: float, dtypes: int = 1
) -> dict[str, float]:
    """A deliberately rough upper-side estimate of each section's duration, from FLOPs and the measured peak (the
    slowest dtype's); the step, finch and torch sections run once per compute dtype (``dtypes``)."""
    step_flops = flops_lib.training_flops_per_step(shape, spec.batch_size, spec.seq_len)
    step_s = step_flops / (peak_flops_per_s * _ESTIMATE_EFFICIENCY) + 0.01
    layers = 1 if spec.scan_layers else shape.num_layers
    jax_compile = _JAX_COMPILE_BASE_S + _JAX_COMPILE_PER_LAYER_S * layers
    timed = spec.warmup + spec.rounds * spec.steps
    jax_runner = jax_compile + timed * step_s
    est: dict[str, float] = {}
    if "step" in spec.sections or "finch" in spec.sections:
        est["step"] = jax_runner
    if "finch" in spec.sections or "torch" in spec.sections:
        est["finch"] = jax_runner  # the adamw runner (also the torch comparison's JAX side)
    if "torch" in spec.sections:
        torch_s = 0.0
        for mode in spec.torch_modes:
            compile_s = _TORCH_COMPILE_BASE_S + _TORCH_COMPILE_PER_LAYER_S * shape.num_layers
            # the PyTorch steps plus the JAX adamw reference steps interleaved with them
            torch_s += (compile_s if mode == "compile" else 0.0) + (timed + 1) * step_s * 1.3 + timed * step_s
        est["torch"] = torch_s
    for main in ("step", "finch", "torch"):
        if main in est:
            est[main] *= dtypes
    if "matmuls" in spec.sections:
        # the forward matmuls of a block and the LM head, M = tokens, per framework/flag set, dtype and call
        calls = spec.rounds * spec.matmul_iters * 2 * (len(set(spec.flag_sets)) + 1)
        forward_tokens = spec.batch_size * spec.seq_len
        per_call = 2.0 * forward_tokens * shape.embed_dim * (2 * shape.mlp_dim + shape.vocab_size) / peak_flops_per_s
        est["matmuls"] = (len(set(spec.flag_sets)) + 1) * _SUBPROCESS_START_S + calls * per_call * 2
    if "profile" in spec.sections:
        profiled = (max(spec.warmup, 1) + spec.profile_steps) * step_s
        est["profile"] = (
            jax_compile + profiled * 1.2 + ((_SUBPROCESS_START_S + profiled) if "eager" in spec.torch_modes else 0.0)
        )
    if "variants" in spec.sections:
        est["variants"] = (1 + len(spec.variants)) * jax_runner * 1.2
    if "trees" in spec.sections:
        est["trees"] = len(spec.trees) * (_SUBPROCESS_START_S + jax_runner * 1.2)
    if "remat" in spec.sections:
        est["remat"] = 4 * jax_runner * 1.2
    if "lora" in spec.sections:
        est["lora"] = 2 * jax_runner
    if "flags" in spec.sections:
        est["flags"] = len(set(spec.flag_sets)) * (_SUBPROCESS_START_S + jax_runner * 1.2)
    if "malloc" in spec.sections:
        est["malloc"] = len(set(spec.mallocs)) * (_SUBPROCESS_START_S + jax_runner * 1.2)
    if "scaling" in spec.sections:
        layouts = sum(1 if n == 1 else len(spec.scaling_layouts) for n in spec.scaling_devices)
        est["scaling"] = len(spec.scaling_devices) * _SUBPROCESS_START_S + layouts * jax_runner * 1.5
    est["total"] = sum(est.values())
    return est


def shrink_advice(spec: BenchSpec, est: dict[str, float]) -> str:
    """The estimate by section, longest first, and the options that shorten the run."""
    parts = sorted(((v, k) for k, v in est.items() if k != "total"), reverse=True)
    lines = [f"  {k}: ~{v / 60:.1f} min" for v, k in parts]
    advice = [
        f"--sections with fewer of {','.join(spec.sections)} (e.g. --sections step,finch)",
        f"--rounds {max(1, spec.rounds - 1)} or --steps 1 (now {spec.rounds} x {spec.steps})",
        f"--batch-size / --seq-len smaller (now {spec.batch_size} x {spec.seq_len})",
        "--torch-modes eager (torch.compile compiles for minutes on a CPU)",
        "--override num_layers=N, or --preset tiny",
        f"--max-minutes larger (now {spec.max_minutes:g})",
    ]
    return "\n".join(lines) + "\nshrink it with:\n" + "\n".join(f"  {a}" for a in advice)
