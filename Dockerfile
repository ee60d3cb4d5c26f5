# sampa-ray image: Ray (with the job server and dashboard) and the sampa-ray package.
#
# CPU (default):
#   docker build -t sampa-ray:local .
# CUDA: a base image with Python >= 3.11 and pip, and a CUDA build of torch, e.g.
#   docker build -t sampa-ray:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   (a base that already ships torch, e.g. a pytorch/pytorch image: --build-arg TORCH_SPEC=)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# a page or folder of wheels that pip also looks in for torch (`pip --find-links`), e.g. a build
# where TORCH_INDEX_URL cannot be reached and the torch wheel comes from the building machine
ARG TORCH_FIND_LINKS=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

WORKDIR /opt/sampa-ray

# every package at the version requirements.lock names (./scripts/lock.sh refreshes it); with
# another torch than the locked CPU build, torch and what only torch needs are left to that build
COPY requirements.lock scripts/constraints.py ./
RUN python3 constraints.py "${TORCH_SPEC}" requirements.lock > /tmp/constraints.txt

# torch first, from its own index, so that the package's open torch range pulls nothing more
# (the install below then moves whatever torch brought along to its locked version)
RUN if [ -n "${TORCH_SPEC}" ]; then \
        python3 -m pip install --index-url "${TORCH_INDEX_URL}" \
            ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} "${TORCH_SPEC}"; \
    fi

COPY pyproject.toml README.md ./
COPY sampa_ray ./sampa_ray
RUN python3 -m pip install -c /tmp/constraints.txt . && sampa-ray train --help > /dev/null

# an unprivileged user; /runs holds the outputs (a volume in docker-compose.yml)
RUN useradd --create-home --uid 1000 sampa \
    && mkdir -p /runs && chown sampa /runs
USER sampa
WORKDIR /home/sampa

# 6379 Ray GCS, 8265 Ray dashboard / job API, 8080 Ray metrics, 9400 sampa-ray metrics
EXPOSE 6379 8265 8080 9400
CMD ["sampa-ray", "--help"]
