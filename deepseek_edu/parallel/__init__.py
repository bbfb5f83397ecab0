"""Systems at CPU scale (notebook 11): expert parallelism, pipeline schedules, EPLB, data parallelism.

`expert_parallel` and `data_parallel` run over `torch.distributed` (gloo on CPU processes, NCCL on GPUs);
`launch.run_ranks` starts local processes for tests and notebooks; `pipeline` simulates schedules and
executes 1F1B; `eplb` places redundant experts.
"""
