"""The tag every GPU task of the flows carries (label shards, training, evaluation).

A Prefect tag concurrency limit on it (`fmbseg deploy --gpu-limit N`, or `prefect concurrency-limit create
fmbseg-gpu N`) lets at most N of them run at once across all workers of a server: set N to the number of GPUs.
"""

GPU_TAG = "fmbseg-gpu"
