#!/usr/bin/env bash
# Prepare .whl/ (git-ignored) for the GPU machine of benchmarks/gpu_suite.py: Python 3.12, x86-64,
# torch 2.11 and transformers 5.17 already there, no network (see ../shared/gpu/README.md).
#
#   .whl/*.whl            what the project needs there and the machine lacks, at the versions this
#                         checkout's .venv runs; installed into one --target for every stage
#   .whl/deepspeed/*.whl  DeepSpeed (a source package: built here with DS_BUILD_OPS=0, its CUDA ops
#                         compile there on first use), transformers < 5.6 (DeepSpeed's CLIP injection
#                         reads CLIPTextModel.text_model, removed in 5.6) with the tokenizers it
#                         accepts, and hjson; installed into a second --target that only the DeepSpeed
#                         stage puts first on its path, so every other stage keeps the machine's own
#                         transformers
#
# Then it checks that every requirement of every wheel is met there, and that .whl/ plus the
# files that travel with the working tree (tracked and untracked-not-ignored) stay under 64 MiB.
# Usage, from anywhere in the checkout, after scripts/setup.sh (DeepSpeed's build needs torch):
#   scripts/gpu-wheels.sh
# The command line for the GPU machine is in benchmarks/README.md (and printed at the end).
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
py=.venv/bin/python
fetch=${FETCH_WHEELS:-../shared/gpu/fetch-wheels.sh}
deepspeed_version=${DEEPSPEED_VERSION:-0.19.8}
transformers_for_deepspeed=${DEEPSPEED_TRANSFORMERS:-5.5.4}
tokenizers_for_deepspeed=${DEEPSPEED_TOKENIZERS:-0.22.2}   # transformers 5.5.4 wants <= 0.23.0
limit_mib=64

[ -x "$py" ] || { echo "no .venv: run scripts/setup.sh first" >&2; exit 1; }
[ -x "$fetch" ] || { echo "no $fetch (the shared wheel fetcher)" >&2; exit 1; }
version() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# 1) a clean folder: two versions of one package stop the install there
rm -rf .whl
mkdir -p .whl/deepspeed

# 2) every stage's wheels, at the versions tested here
main=()
for name in diffusers fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv uvicorn \
            typing-inspection annotated-types typing-extensions opentelemetry-api; do
  main+=("$name==$(version "$name")")
done
"$fetch" "${main[@]}" >/dev/null

# 3) the DeepSpeed stage's wheels, in their own folder
"$fetch" "transformers==$transformers_for_deepspeed" "tokenizers==$tokenizers_for_deepspeed" hjson >/dev/null
mv .whl/transformers-*.whl .whl/tokenizers-*.whl .whl/hjson-*.whl .whl/deepspeed/
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$py" -m pip wheel -q --no-deps --no-build-isolation \
  -w .whl/deepspeed "deepspeed==$deepspeed_version"

# 4) requirements met there, and the size of what travels
"$py" - "$limit_mib" <<'PY'
"""What the GPU machine will lack: 1) a Requires-Dist of a wheel here that is neither a wheel
beside it nor a package the machine has; 2) a distribution whose modules the suite's stages or
the GPU tests import (found by importing them here, in .venv) that the machine lacks. Then the
size of .whl plus the working tree that travels."""
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

# The GPU machine's Python packages (its image's list, read 2026-11; torch 2.11, transformers 5.17).
HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# Imported here only because they are installed here: diffusers' importlib_metadata is for
# Python < 3.8; uvicorn imports watchfiles for --reload; accelerate imports boto3 (and its
# dependencies) for SageMaker, and anyio sniffio, when they are there.
OPTIONAL = {"importlib-metadata", "watchfiles", "boto3", "botocore", "jmespath", "s3transfer", "sniffio"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    return canonical(path.name.split("-")[0])


def requirements(path: Path) -> list[Requirement]:
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(meta).decode().splitlines()
    return [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]


env = default_environment() | {"python_version": "3.12", "python_full_version": "3.12.3",
                               "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
main = sorted(Path(".whl").glob("*.whl"))
deepspeed = sorted(Path(".whl/deepspeed").glob("*.whl"))
missing = []
# 1) the wheels' own requirements
for wheels, beside in ((main, main), (deepspeed, main + deepspeed)):
    names = {wheel_name(w) for w in beside} | HAS | OPTIONAL
    for w in wheels:
        for req in requirements(w):
            if (req.marker is None or req.marker.evaluate(env)) and canonical(req.name) not in names:
                missing.append(f"{w.name} needs {req}")
# 2) what the stages and the GPU tests import, less what the machine's own packages bring along
before = set(sys.modules)
sys.path[:0] = [".", "benchmarks"]
import gpu_stages  # noqa: E402

gpu_stages.preload()
import tests.conftest  # noqa: E402, F401  (pytest imports it before tests/engine/test_gpu.py)
import tests.engine.test_gpu  # noqa: E402, F401

owner, needs = {}, {}
for dist in importlib.metadata.distributions():
    name = canonical(dist.metadata["Name"])
    for file in dist.files or ():
        if file.suffix in (".py", ".so"):
            owner[str(dist.locate_file(file).resolve())] = name
    needs[name] = {canonical(Requirement(r).name) for r in dist.requires or () if "extra ==" not in r}
# what the machine's own packages need comes with them there (their versions' needs, not these)
brought, todo = set(), [n for n in HAS if n in needs]
while todo:
    for dep in needs.get(todo.pop(), ()):
        if dep not in brought:
            brought.add(dep)
            todo.append(dep)
files = {str(Path(m.__file__).resolve()) for n, m in list(sys.modules.items())
         if n not in before and getattr(m, "__file__", None)}
imported = {owner[f] for f in files if f in owner} - {"sd-endpoint"}
have = {wheel_name(w) for w in main} | HAS | OPTIONAL | brought
missing += [f"the suite imports {d}" for d in sorted(imported - have)]
if missing:
    sys.exit("not met on the GPU machine:\n  " + "\n  ".join(missing))
print(f"imports: {len(imported)} distributions, each a wheel here or on the GPU machine")

listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], capture_output=True,
                        check=True).stdout.decode().split("\0")
tree = sum(Path(f).stat().st_size for f in listed if f and Path(f).is_file())
size = sum(p.stat().st_size for p in Path(".whl").rglob("*") if p.is_file())
limit = int(sys.argv[1]) * 2**20
print(f"wheels: {len(main)} for every stage, {len(deepspeed)} for the DeepSpeed stage")
print(f"size: source tree {tree / 2**20:.1f} MiB + .whl {size / 2**20:.1f} MiB = "
      f"{(tree + size) / 2**20:.1f} MiB (limit {limit // 2**20} MiB)")
if tree + size >= limit:
    sys.exit("too large to travel: drop wheels or files")
PY
ls -1 .whl .whl/deepspeed
cat <<'TXT'
On the GPU machine, from the project's root (carry .whl), as one command of at most 10 minutes:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-ds .whl/deepspeed/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && timeout 585 python3 benchmarks/gpu_suite.py --out "$OUT/gpu-suite" --deepspeed-site /tmp/site-ds
TXT
