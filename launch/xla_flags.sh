# XLA flags for training on GPUs and TPUs; sourced by launch/gpu_local.sh, launch/slurm.sbatch,
# launch/tpu_pod.sh and benchmarks/accelerator_check.sh.
#
# XLA stops at start-up on a flag it does not know. Every name below was checked against
# jaxlib 0.10.2 (the GPU set; tests/test_accelerator_check.py checks it against the installed
# jaxlib) and libtpu 0.0.42.1 (the TPU set), the versions that 'jax[cuda12]' / 'jax[tpu]' 0.10
# install. When a flag is given twice the later one wins: gpu_xla_flags and tpu_init_args put
# these first and the caller's own XLA_FLAGS / LIBTPU_INIT_ARGS after them.

# GPU: MaxText's set for GPU training, read through XLA_FLAGS.
GPU_XLA_FLAGS=(
  # Schedule the asynchronous collectives (FSDP's all-gathers, the gradients' reduce-scatters
  # and all-reduces) to overlap with compute that does not depend on them.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Matmuls through cuBLAS(Lt) only, not XLA's Triton-generated GEMM kernels.
  --xla_gpu_enable_triton_gemm=false
  # No CUDA graphs: an empty list of the op kinds XLA may capture into command buffers.
  --xla_gpu_enable_command_buffer=''
  # Collectives on the highest-priority CUDA stream, so that queued compute does not delay them.
  --xla_gpu_enable_highest_priority_async_stream=true
  # Combine small collectives of one kind into one NCCL call of up to this many bytes
  # (128 MiB all-reduce and all-gather, 64 MiB reduce-scatter).
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  # In loops (gradient accumulation's scan), move collectives across iterations so that they
  # overlap the previous or next iteration's compute.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Unroll loops by two, so that each iteration's collectives can overlap the other's compute.
  --xla_gpu_enable_while_loop_double_buffering=true
  # No rematerialisation pass: XLA does not recompute activations on its own to fit memory (a
  # step that does not fit fails instead of slowing down); config.model.remat chooses that.
  --xla_disable_hlo_passes=rematerialization
)

# TPU: MaxText's continuation-fusion set, read by libtpu through LIBTPU_INIT_ARGS.
TPU_LIBTPU_FLAGS=(
  # Continuation fusion: run collectives asynchronously, fused with the compute that hides them,
  # all-gathers included (FSDP's parameter gathers), spread over several steps of the schedule.
  --xla_tpu_enable_async_collective_fusion=true
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true
  # Let collectives overlap compute on the TensorCore.
  --xla_tpu_overlap_compute_collective_tc=true
  # All-gathers and all-reduces (data-parallel gradients) as asynchronous start/done pairs.
  --xla_enable_async_all_gather=true
  --xla_enable_async_all_reduce=true
)

# The GPU set followed by the caller's XLA_FLAGS (which win where they repeat a flag).
gpu_xla_flags() { echo "${GPU_XLA_FLAGS[*]}${XLA_FLAGS:+ $XLA_FLAGS}"; }

# The TPU set followed by the caller's LIBTPU_INIT_ARGS.
tpu_init_args() { echo "${TPU_LIBTPU_FLAGS[*]}${LIBTPU_INIT_ARGS:+ $LIBTPU_INIT_ARGS}"; }
