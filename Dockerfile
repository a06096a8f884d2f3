# The project on Ray's own image, for cluster nodes (cluster/aws.yaml, cluster/kuberay.yaml).
#   docker build -t rs5m-ray:0.1.0-py311 .                                  CPU nodes, head
#   docker build --build-arg VARIANT=-gpu -t rs5m-ray:0.1.0-py311-gpu .      GPU nodes (CUDA torch)
# RAY_VERSION must be the `ray` pin of constraints.txt (tests/test_cluster_ops.py checks it).
ARG RAY_VERSION=2.60.0
ARG VARIANT=
FROM rayproject/ray:${RAY_VERSION}-py311${VARIANT}

WORKDIR /home/ray/rs5m
# Dependencies first, in their own layer: a code change does not reinstall torch.
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
RUN mkdir rs5m_ray && touch rs5m_ray/__init__.py \
    && pip install --no-cache-dir -c constraints.txt . \
    && pip uninstall -y rs5m-ray
COPY --chown=ray:users rs5m_ray ./rs5m_ray
RUN pip install --no-cache-dir --no-deps -c constraints.txt . && rs5m --help > /dev/null
# Job configs and benchmarks ride along: RayJobs name them by absolute path.
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users benchmarks ./benchmarks
