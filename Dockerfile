# GPU image for the scoring server: `docker build -t sd-endpoint:0.1.0 .`
# The model is never baked in: mount a diffusers folder (or an Azure ML model folder) read-only at /models/sd.
# Build with `--build-arg EXTRAS=ray` for the image that KubeRay runs (deploy/ray/rayservice.yaml), and with
# `--build-arg EXTRA_PACKAGES=azureml-core` for Azure ML batch deployments (their driver imports it).
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

ARG EXTRAS=""
ARG EXTRA_PACKAGES=""
# KubeRay's default health probes call wget, which the base image lacks.
RUN case ",${EXTRAS}," in *,ray,*) \
        apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/* ;; \
    esac

# 1. Dependencies in their own layer, keyed only on pyproject.toml, so that editing the code does not
#    reinstall them. torch is already in the base image and satisfies the pin, so pip keeps it.
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [name for name in sys.argv[1].split(',') if name]; \
print('\n'.join(project['dependencies'] + [dep for name in extras for dep in project['optional-dependencies'][name]]))" \
        "$EXTRAS" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt ${EXTRA_PACKAGES} \
    && rm /tmp/requirements.txt

# 2. The code; its dependencies are already there.
COPY README.md ./
COPY schemas ./schemas
COPY model ./model
COPY service ./service
RUN pip install --no-cache-dir --no-deps . && rm -rf build *.egg-info

# 3. A numeric non-root user (Kubernetes' runAsNonRoot can only verify a numeric one) that owns the
#    writable cache; /models stays root-owned because it is mounted read-only.
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash app \
    && mkdir -p /models /cache/compile /cache/huggingface \
    && chown -R 1000:1000 /cache

# Every path the server writes to lives under /cache, a volume, so compiled kernels survive restarts.
ENV SD_MODEL=/models/sd \
    SD_COMPILE_CACHE_DIR=/cache/compile \
    TORCHINDUCTOR_CACHE_DIR=/cache/compile/inductor \
    TRITON_CACHE_DIR=/cache/compile/triton \
    HF_HOME=/cache/huggingface \
    SD_LOG_FORMAT=json
VOLUME ["/models", "/cache"]

USER 1000:1000
EXPOSE 5001

# `/` answers 200 only once the model is loaded and warmed up; loading a full model can take minutes.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SD_PORT', '5001') + '/', timeout=8)"]

# One engine per GPU the container sees, behind one queue (SD_DEVICES is unset, so "all" on CUDA):
# `docker run --gpus all` on a multi-GPU VM serves every GPU; SD_DEVICES=cuda:0,cuda:1 or SD_DEVICE=cuda:1
# picks some. Scale SD_MAX_QUEUE_ITEMS and the front end's concurrency by the GPU count (docs/deploy.md).
CMD ["sd-endpoint", "serve", "--host", "0.0.0.0"]
