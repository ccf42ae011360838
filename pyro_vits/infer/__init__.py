"""Inference: Pyro ELBOs (and their registry), Monte-Carlo evaluation, data-parallel SVI and diagnostics
(gradient SNR, ArviZ InferenceData, PSIS k-hat)."""

from __future__ import annotations

from .diagnostics import (
    KHAT_THRESHOLDS,
    GradientStats,
    finish_run,
    gradient_stats,
    guide_samples,
    khat_counts,
    markdown_table,
    psis_khat_per_utterance,
    run_to_inference_data,
    summary_table,
    sweep_to_inference_data,
    trace_arrays,
    utterance_log_weights,
    write_run_inference_data,
    write_summary,
)
from .distributed import (
    DataParallelELBO,
    DistributedContext,
    distributed_context,
    init_distributed,
    is_main_process,
    launched_by_torchrun,
    minibatch_indices,
    noise_seed,
    rank,
    shard,
    teardown,
    world_size,
)
from .elbo import (
    ELBOS,
    KL_PARTICLE_ELBOS,
    MC_ELBO,
    STL_ELBO,
    HybridEntropyELBO,
    IWAE_DReG,
    analytic_entropy,
    detach_distribution,
    kl_particle_sites,
    make_elbo,
)
from .evaluate import EVAL_CHUNK_ELEMENTS, default_eval_chunk, evaluate

__all__ = ["GradientStats", "gradient_stats", "KHAT_THRESHOLDS", "trace_arrays", "run_to_inference_data", "sweep_to_inference_data", "summary_table", "markdown_table", "write_summary", "guide_samples", "utterance_log_weights", "psis_khat_per_utterance", "khat_counts", "write_run_inference_data", "finish_run", "DataParallelELBO", "DistributedContext", "distributed_context", "init_distributed", "is_main_process", "launched_by_torchrun", "minibatch_indices", "noise_seed", "rank", "shard", "teardown", "world_size", "ELBOS", "KL_PARTICLE_ELBOS", "HybridEntropyELBO", "STL_ELBO", "MC_ELBO", "IWAE_DReG", "analytic_entropy", "detach_distribution", "kl_particle_sites", "make_elbo", "EVAL_CHUNK_ELEMENTS", "default_eval_chunk", "evaluate"]
