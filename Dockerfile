# syntax=docker/dockerfile:1
#
# fairdeploy images: export, engine building and re-validation on the machine that runs the model.
#
#   Workstation / server GPU (x86_64, CUDA 12.8, TensorRT 10.8 from the NGC PyTorch container):
#     docker build -t fairdeploy .
#     docker run --rm --gpus all -v "$PWD:/work" fairdeploy export --model /work/run/best \
#         --out /work/export --profile workstation-int8 --data /work/data/manifest.csv
#
#   Jetson Orin (JetPack 6.1/6.2 = L4T r36.4, CUDA 12.6, TensorRT 10.3), built on the device or with buildx:
#     docker build --target jetson -t fairdeploy:jetson .
#     docker run --rm --runtime nvidia -v "$PWD:/work" fairdeploy:jetson export ... --profile jetson-orin-nano-fp16
#   On Jetson the GPU runs TensorRT engines; ONNX Runtime in this image runs on the CPU (see the jetson stage).
#
# Engines are tied to the TensorRT version and GPU they were built with: build them inside the image that will
# run them (the sidecar JSON beside each engine records both and is checked on load). The export profiles and
# calibration recipes are package data of fairdeploy: a ./export or ./calibration folder in the working directory
# (/work above) overrides them by name (see fairdeploy/resources/__init__.py).
#
# What each image installs, and what it must not:
# * torch, torchvision and tensorrt come from the base image (the CUDA build that matches the base's driver stack
#   and TensorRT); pip is given constraints pinning them (docker/base_requirements.py), so nothing reinstalls or
#   upgrades them. fairdeploy itself is installed with --no-deps; its other requirements are read from its own
#   metadata (pyproject.toml), minus the ones the base provides.
# * Workstation: onnxruntime-gpu ONLY. `onnxruntime` and `onnxruntime-gpu` install the same `onnxruntime` module;
#   with both present the CPU package's files hide the CUDA provider, so the CPU package is left out.

ARG PYTORCH_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
ARG JETSON_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0

# ---------------------------------------------------------------------------------------------------
# Jetson (L4T r36.x = JetPack 6.x: CUDA 12.6, cuDNN 9.3, TensorRT 10.3, Ubuntu 22.04, Python 3.10).
# TensorRT and its Python bindings come from JetPack's Debian packages (PyPI's tensorrt wheels do not target
# Tegra), so the venv sees the system site-packages. PyPI's aarch64 torch is built without CUDA for Tegra and
# cannot use the Orin GPU: torch is NVIDIA's JetPack 6 wheel ("Installing PyTorch for Jetson Platform",
# docs.nvidia.com/deeplearning/frameworks/install-pytorch-jetson-platform/; the v61 wheel below is the one
# NVIDIA's Torch-TensorRT build for JetPack 6.1 installs). JetPack's TensorRT/torch Python builds are for
# numpy 1.x: numpy<2. No `import tensorrt` (or torch) while building: libnvinfer needs the GPU driver, which
# only the nvidia runtime provides when the container runs.
#
# ONNX Runtime runs on the CPU in this image. PyPI has no CUDA onnxruntime-gpu wheel for aarch64 (`pip download
# onnxruntime-gpu` for cp310 manylinux aarch64 finds none; ONNX Runtime's maintainers: "no plans ... the best we
# can do is a manual publish to jetson zoo", github.com/microsoft/onnxruntime/issues/20503), so the `onnxruntime`
# installed here is PyPI's CPU build: `fairdeploy validate` of an ONNX file uses the Orin's CPU cores, a TensorRT
# engine uses its GPU (and DLA). The GPU build for JetPack comes from NVIDIA's Jetson Zoo
# (elinux.org/Jetson_Zoo#ONNX_Runtime: onnxruntime_gpu wheels per JetPack and Python); it must match this image's
# JetPack (CUDA 12.6, cuDNN 9, Python 3.10). To use one, derive an image that runs
# `pip uninstall -y onnxruntime && pip install <that wheel>` (the two packages install the same module: never both).
#
# cuda-python is pinned to the image's CUDA (12.6): the open range `<13` resolves to 12.9, whose bindings are
# newer than JetPack 6's CUDA 12.6 driver.
FROM ${JETSON_IMAGE} AS jetson

ARG JETSON_TORCH_WHEEL=https://developer.download.nvidia.com/compute/redist/jp/v61/pytorch/torch-2.5.0a0+872d972e41.nv24.08.17622132-cp310-cp310-linux_aarch64.whl
# torchvision: NVIDIA ships no JetPack wheel; PyPI's 0.20 (the release for torch 2.5) without its dependencies,
# so it cannot pull PyPI's torch. fairdeploy uses its model definitions only (its compiled ops may warn).
ARG TORCHVISION_VERSION=0.20.0
# NVIDIA's torch >= 24.06 wheels need cuSPARSELt, which JetPack 6 does not ship (archive and steps from
# pytorch.org/TensorRT/getting_started/jetpack.html, "Ensure libcusparseLt.so exists").
ARG CUSPARSELT_URL=https://developer.download.nvidia.com/compute/cusparselt/redist/libcusparse_lt/linux-sbsa/libcusparse_lt-linux-sbsa-0.5.2.1-archive.tar.xz
# The image's CUDA major.minor (JetPack 6.1/6.2: 12.6): cuda-python's bindings for it.
ARG CUDA_PYTHON_VERSION=12.6.*

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv python3-pip libopenblas0 curl ca-certificates xz-utils \
    && rm -rf /var/lib/apt/lists/* \
    && curl -fsSLo /tmp/cusparselt.tar.xz "${CUSPARSELT_URL}" \
    && mkdir /tmp/cusparselt && tar -xf /tmp/cusparselt.tar.xz -C /tmp/cusparselt --strip-components=1 \
    && cp -a /tmp/cusparselt/include/* /usr/local/cuda/include/ \
    && cp -a /tmp/cusparselt/lib/* /usr/local/cuda/lib64/ \
    && rm -rf /tmp/cusparselt /tmp/cusparselt.tar.xz \
    && python3 -m venv --system-site-packages /opt/venv

# The torch wheel is pinned by its URL (hadolint reads it as an unpinned name).
# hadolint ignore=DL3013
RUN python -m pip install "numpy>=1.24,<2" "${JETSON_TORCH_WHEEL}" \
    && python -m pip install --no-deps "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/fairdeploy
COPY docker/base_requirements.py /tmp/base_requirements.py
COPY pyproject.toml README.md ./
COPY fairdeploy ./fairdeploy
# fairdeploy without dependencies, then its requirements minus torch/torchvision (installed above), with
# torch, torchvision, numpy and (when pip can see it) JetPack's tensorrt pinned; cuda-python for CUDA 12.6;
# onnxruntime: PyPI's CPU build (see above).
RUN python -m pip install --no-deps . \
    && python /tmp/base_requirements.py /tmp/requirements.txt /tmp/constraints.txt \
        --provided torch torchvision numpy --pin tensorrt \
    && python -m pip install -r /tmp/requirements.txt -c /tmp/constraints.txt "cuda-python==${CUDA_PYTHON_VERSION}" \
    && fairdeploy --help > /dev/null

WORKDIR /work
ENTRYPOINT ["fairdeploy"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------
# Workstation (default target): NGC PyTorch 25.01 = CUDA 12.8, cuDNN 9.7, torch 2.6.0a0 (nv25.1), TensorRT 10.8,
# Python 3.12, Ubuntu 24.04 (NVIDIA's framework release matrix, e.g. docs.nvidia.com/deeplearning/
# triton-inference-server/user-guide/docs/introduction/compatibility.html, row 25.01). torch is the base's CUDA
# 12.8 build and TensorRT the base's; nothing here reinstalls either.
# onnxruntime-gpu: PyPI's 1.19-1.22 wheels are built for CUDA 12.x + cuDNN 9.x ("Starting with version 1.19,
# CUDA 12.x becomes the default", onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html); later
# lines move to CUDA 13. Change ORT_GPU_VERSION and CUDA_PYTHON_VERSION together with PYTORCH_IMAGE (a CUDA 13
# base takes a CUDA 13 onnxruntime-gpu and cuda-python 13).
FROM ${PYTORCH_IMAGE} AS workstation

ARG ORT_GPU_VERSION=1.22.0
# The base's CUDA major.minor (NGC 25.01: 12.8): cuda-python's bindings for it (`<13` would take 12.9).
ARG CUDA_PYTHON_VERSION=12.8.*

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv --system-site-packages /opt/venv

WORKDIR /opt/fairdeploy
COPY docker/base_requirements.py /tmp/base_requirements.py
COPY pyproject.toml README.md ./
COPY fairdeploy ./fairdeploy
# fairdeploy without dependencies; its requirements minus torch/torchvision (the base's) and onnxruntime (replaced
# by onnxruntime-gpu), with the base's torch, torchvision, tensorrt and numpy pinned; cuda-python for CUDA 12.8.
RUN python -m pip install --no-deps . \
    && python /tmp/base_requirements.py /tmp/requirements.txt /tmp/constraints.txt \
        --provided torch torchvision --replaced onnxruntime --pin tensorrt numpy \
    && python -m pip install -r /tmp/requirements.txt -c /tmp/constraints.txt \
        "onnxruntime-gpu==${ORT_GPU_VERSION}" "cuda-python==${CUDA_PYTHON_VERSION}" \
    && fairdeploy --help > /dev/null

WORKDIR /work
ENTRYPOINT ["fairdeploy"]
CMD ["--help"]
