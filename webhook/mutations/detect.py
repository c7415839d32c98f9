"""Model auto-detection: which framework an app container runs and which model it loads.

Used when ``modelcache.io/model`` is absent: vLLM (``vllm serve X``, ``--model X``,
``--model=X``, ``python -m vllm.entrypoints.openai.api_server --model X``), SGLang
(``--model-path``), TGI (``--model-id``, ``MODEL_ID``), llama.cpp (``-m``, ``--hf-repo``), NIM
(``NIM_MODEL_PATH``), also inside ``sh -c "..."`` scripts. A value is a model only when it is
a model URI or a Hub id ``org/name``; local paths are not sources we can fetch.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any, Final

from sidecar.modelsource import (
    ModelSourceError,
    NamedModel,
    hub_id_to_uri,
    parse_model_spec,
    parse_model_uri,
)
from webhook.mutations.context import Container, app_containers

_SHELLS: Final = ("sh", "bash", "ash", "dash", "zsh")
_SHELL_C: Final = re.compile(r"^-[a-z]*c[a-z]*$")


@dataclass(frozen=True)
class Framework:
    """Where a serving framework takes its model, and how it names it to clients."""

    name: str
    model_flags: tuple[str, ...]
    tokenizer_flags: tuple[str, ...] = ()
    served_name_flag: str | None = None
    model_env: tuple[str, ...] = ()
    served_name_env: str | None = None
    #: ``vllm serve <model>``: the positional after this subcommand
    serve_positional: bool = False
    #: llama.cpp: ``--hf-repo org/name[:quant]`` (+ ``--hf-file F``)
    hub_repo_flags: tuple[str, ...] = ()


VLLM: Final = Framework(
    "vllm",
    ("--model",),
    ("--tokenizer",),
    "--served-model-name",
    serve_positional=True,
)
SGLANG: Final = Framework(
    "sglang", ("--model-path", "--model"), ("--tokenizer-path",), "--served-model-name"
)
TGI: Final = Framework("tgi", ("--model-id",), ("--tokenizer-config-path",), None, ("MODEL_ID",))
LLAMACPP: Final = Framework(
    "llama.cpp", ("-m", "--model"), (), "--alias", hub_repo_flags=("--hf-repo", "-hfr", "-hf")
)
NIM: Final = Framework("nim", (), (), None, ("NIM_MODEL_PATH",), "NIM_SERVED_MODEL_NAME")
#: For containers of an unknown framework when the model comes from the annotation.
GENERIC: Final = Framework("generic", ("--model", "--model-path", "--model-id"))
FRAMEWORKS: Final = (VLLM, SGLANG, TGI, LLAMACPP, NIM)


def basename(token: str) -> str:
    return token.rsplit("/", 1)[-1]


def container_argv(container: Container) -> list[str]:
    """``command + args`` (strings only); the image entrypoint is unknown to us."""
    out: list[str] = []
    for key in ("command", "args"):
        value = container.get(key)
        if isinstance(value, list):
            out.extend(v for v in value if isinstance(v, str))
    return out


def script_index(argv: list[str]) -> int | None:
    """Index in argv of the script of ``sh -c SCRIPT`` (or bash -lc, ...), else None."""
    for i, token in enumerate(argv[:-1]):
        if basename(token) in _SHELLS:
            for j in range(i + 1, len(argv) - 1):
                if _SHELL_C.match(argv[j]):
                    return j + 1
                if not argv[j].startswith("-"):
                    break
            return None
    return None


def split_script(script: str) -> list[str]:
    try:
        return shlex.split(script, comments=True)
    except ValueError:
        return script.split()


def env_value(container: Container, name: str) -> str | None:
    for item in container.get("env") or []:
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get("value")
            return value if isinstance(value, str) else None
    return None


def has_env(container: Container, name: str) -> bool:
    return any(
        isinstance(item, dict) and item.get("name") == name for item in container.get("env") or []
    )


def identify_framework(container: Container, tokens: list[str]) -> Framework | None:
    """The framework a container runs, from its argv tokens, env and image name."""
    names = {basename(t) for t in tokens}
    joined = " ".join(tokens)
    image = str(container.get("image") or "").lower()
    if "vllm" in names or "vllm.entrypoints.openai.api_server" in joined:
        return VLLM
    if "sglang.launch_server" in joined or "sglang" in names:
        return SGLANG
    if "text-generation-launcher" in names:
        return TGI
    if names & {"llama-server", "llama-cli"}:
        return LLAMACPP
    if has_env(container, "NIM_MODEL_PATH") or "nvcr.io/nim" in image:
        return NIM
    # the image's entrypoint runs the server when only args are given
    if "vllm" in image:
        return VLLM
    if "sglang" in image:
        return SGLANG
    if "text-generation-inference" in image:
        return TGI
    if any(s in image for s in ("llama.cpp", "llama-cpp", "llamacpp")):
        return LLAMACPP
    return None


def flag_value(tokens: list[str], i: int, flags: tuple[str, ...]) -> tuple[int, str] | None:
    """If ``tokens[i]`` is ``--flag VALUE`` or ``--flag=VALUE`` for one of flags: the value.

    Returns (index of the token holding the value, value).
    """
    token = tokens[i]
    for flag in flags:
        if token == flag and i + 1 < len(tokens):
            return i + 1, tokens[i + 1]
        if token.startswith(flag + "="):
            return i, token[len(flag) + 1 :]
    return None


def serve_positional_index(container: Container, fw: Framework, tokens: list[str]) -> int | None:
    """Index of ``X`` in ``vllm serve X``; or 0 when the container gives args only (the vLLM
    image's entrypoint is ``vllm serve``) and the first one names a model."""
    if not fw.serve_positional:
        return None
    for i, token in enumerate(tokens[:-1]):
        if basename(token) == "vllm" and tokens[i + 1] == "serve":
            j = i + 2
            return j if j < len(tokens) and not tokens[j].startswith("-") else None
    if not container.get("command") and tokens and model_uri(tokens[0]):
        return 0
    return None


def hub_repo_id(value: str) -> str:
    """``org/name:Q4_K_M`` (llama.cpp quant tag) → ``org/name``."""
    return value.split(":", 1)[0]


def model_uri(value: str) -> str | None:
    """The normalized source URI when a flag/env value names a fetchable model."""
    uri = value if "://" in value else hub_id_to_uri(value)
    if uri is None:
        return None
    try:
        return parse_model_uri(uri).uri
    except ModelSourceError:
        return None


@dataclass(frozen=True)
class Detected:
    container: str
    framework: str
    where: str  # e.g. "args", "command", "env MODEL_ID"
    value: str
    uri: str


def model_values(container: Container, fw: Framework, tokens: list[str]) -> list[str]:
    """Raw values naming the model in argv tokens and env of one container, in order."""
    found: list[str] = []
    idx = serve_positional_index(container, fw, tokens)
    if idx is not None:
        found.append(tokens[idx])
    for i in range(len(tokens)):
        hit = flag_value(tokens, i, fw.model_flags)
        if hit:
            found.append(hit[1])
        hit = flag_value(tokens, i, fw.hub_repo_flags)
        if hit:
            found.append(hub_repo_id(hit[1]))
    for name in fw.model_env:
        value = env_value(container, name)
        if value:
            found.append(value)
    return found


def container_tokens(container: Container) -> list[str]:
    argv = container_argv(container)
    idx = script_index(argv)
    if idx is not None:
        return argv[:idx] + split_script(argv[idx]) + argv[idx + 1 :]
    return argv


def detect_container(container: Container) -> list[Detected]:
    tokens = container_tokens(container)
    fw = identify_framework(container, tokens)
    if fw is None:
        return []
    out: list[Detected] = []
    for value in model_values(container, fw, tokens):
        uri = model_uri(value)
        if uri:
            out.append(Detected(str(container.get("name")), fw.name, "args", value, uri))
    return out


def detect_models(spec: dict[str, Any]) -> tuple[list[NamedModel], list[Detected]]:
    """Models the app containers load, in container order, deduplicated by URI.

    Names come from the last path segment; a clash gets ``-2``, ``-3`` appended.
    """
    detected: list[Detected] = []
    for container in app_containers(spec):
        detected.extend(detect_container(container))
    uris: list[str] = []
    for d in detected:
        if d.uri not in uris:
            uris.append(d.uri)
    models: list[NamedModel] = []
    names: set[str] = set()
    for uri in uris:
        (model,) = parse_model_spec(uri)
        name, n = model.name, 2
        while name in names:
            suffix = f"-{n}"
            name, n = model.name[: 63 - len(suffix)] + suffix, n + 1
        names.add(name)
        models.append(NamedModel(name, model.source))
    return models, detected


def references(model: NamedModel, raw_values: list[str]) -> tuple[str, ...]:
    """Strings an app container may use to name this model."""
    refs: list[str] = [model.source.uri]
    if model.source.uri.endswith("/"):
        refs.append(model.source.uri.rstrip("/"))
    if model.source.hub_id:
        refs.append(model.source.hub_id)
        refs.append(f"hf://{model.source.hub_id}")
    for raw in raw_values:
        if model_uri(raw) == model.source.uri or model_uri(hub_repo_id(raw)) == model.source.uri:
            refs.append(raw)
    out: list[str] = []
    for r in refs:
        if r and r not in out:
            out.append(r)
    # longest first, so a reference that is a prefix of another never wins
    return tuple(sorted(out, key=len, reverse=True))
