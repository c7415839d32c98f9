"""What an app container runs and which models it loads: read once per container.

``read_container`` turns one container into ``ContainerFacts``: its argv tokens (``sh -c``
scripts split into words, ``$(VAR)`` / ``${VAR}`` / ``$VAR`` resolved from the container's
own ``env`` values), its framework (see ``webhook.frameworks``), every model it names with
the role it plays (base model, tokenizer, LoRA adapter, draft model) and its revision, and
where its Hugging Face client caches. Everything after detection (delivery, rewrites, the
status) reads these facts; nothing re-tokenizes.

A value is a model only when it is a model URI or a Hub id ``org/name``; local paths are not
sources we can fetch.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Final

from sidecar.modelsource import (
    DEFAULT_HF_REVISION,
    ModelSource,
    ModelSourceError,
    NamedModel,
    hub_id_to_uri,
    parse_model_spec,
    parse_model_uri,
)
from webhook.frameworks import (
    KSERVE_HF,
    LLAMACPP,
    NIM,
    OLLAMA,
    RAY_SERVE,
    SGLANG,
    TGI,
    VLLM,
    Framework,
)
from webhook.mutations.context import Container, app_containers

_SHELLS: Final = ("sh", "bash", "ash", "dash", "zsh")
_SHELL_C: Final = re.compile(r"^-[a-z]*c[a-z]*$")
_K8S_VAR: Final = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_SH_VAR: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
#: env vars naming where a Hugging Face client caches, most specific first
HUB_CACHE_ENV: Final = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")
#: credentials of the app containers that our containers carry too (never endpoints: a pod
#: that could point the warm-up at its own server would fill the shared node cache with its
#: own files under another tenant's model; endpoints come from the cluster's Secrets only)
CREDENTIAL_ENV: Final = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "GCS_ACCESS_KEY_ID",
    "GCS_SECRET_ACCESS_KEY",
    "GCS_REGION",
)
ROLES: Final = ("base", "tokenizer", "lora", "draft")


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


def env_values(container: Container) -> dict[str, str]:
    """The container's explicit env values (``value`` only; ``valueFrom`` is unknown here),
    with ``$(VAR)`` references to earlier entries resolved as the kubelet does."""
    out: dict[str, str] = {}
    for item in container.get("env") or []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            value = item.get("value")
            if isinstance(value, str):
                out[item["name"]] = expand_k8s(value, out)
    return out


def env_names(container: Container) -> set[str]:
    return {
        str(item["name"])
        for item in container.get("env") or []
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    }


def expand_k8s(value: str, env: dict[str, str]) -> str:
    """``$(VAR)`` → its value when known (``$$`` escapes), as the kubelet expands argv."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _K8S_VAR.sub(sub, value)


def expand_shell(value: str, env: dict[str, str]) -> str:
    """``${VAR}`` / ``$VAR`` → its value when the container's env sets it."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return env.get(name, m.group(0))

    return _SH_VAR.sub(sub, value)


def identify_framework(container: Container, tokens: list[str]) -> Framework | None:
    """The framework a container runs, from its argv tokens, env and image name."""
    names = {basename(t) for t in tokens}
    joined = " ".join(tokens)
    image = str(container.get("image") or "").lower()
    env = env_names(container)
    if "vllm" in names or "vllm.entrypoints.openai.api_server" in joined:
        return VLLM
    if "sglang.launch_server" in joined or "sglang" in names:
        return SGLANG
    if "text-generation-launcher" in names:
        return TGI
    if names & {"llama-server", "llama-cli"}:
        return LLAMACPP
    if "huggingfaceserver" in joined:
        return KSERVE_HF
    if "ollama" in names:
        return OLLAMA
    if "NIM_MODEL_PATH" in env or "NIM_MODEL_NAME" in env or "nvcr.io/nim" in image:
        return NIM
    if ("serve" in names and "run" in names) or "serve deploy" in joined:
        return RAY_SERVE
    # the image's entrypoint runs the server when only args are given
    if "vllm" in image:
        return VLLM
    if "sglang" in image:
        return SGLANG
    if "text-generation-inference" in image:
        return TGI
    if any(s in image for s in ("llama.cpp", "llama-cpp", "llamacpp")):
        return LLAMACPP
    if "huggingfaceserver" in image:
        return KSERVE_HF
    if "ollama" in image:
        return OLLAMA
    return None


def norm_flag(name: str) -> str:
    """``--speculative_config`` → ``--speculative-config``: Python servers built on argparse
    with ``_``/``-`` aliases (vLLM, SGLang) accept both spellings, and manifests use both."""
    return name.replace("_", "-") if name.startswith("--") else name


def split_flag(token: str) -> tuple[str, str, bool, str]:
    """(flag as written, normalized flag, has ``=VALUE``, value) of one argv token."""
    name, eq, value = token.partition("=")
    return name, norm_flag(name), bool(eq), value


def flag_at(tokens: list[str], i: int, flags: tuple[str, ...]) -> tuple[int, str, str] | None:
    """If ``tokens[i]`` is ``--flag VALUE`` or ``--flag=VALUE`` for one of flags (either
    spelling): (index of the token holding the value, value, the flag as written)."""
    written, name, eq, value = split_flag(tokens[i])
    for flag in flags:
        if name != norm_flag(flag):
            continue
        if eq:
            return i, value, written
        if i + 1 < len(tokens):
            return i + 1, tokens[i + 1], written
    return None


def flag_value(tokens: list[str], i: int, flags: tuple[str, ...]) -> tuple[int, str] | None:
    """If ``tokens[i]`` is ``--flag VALUE`` or ``--flag=VALUE`` for one of flags: the value.

    Returns (index of the token holding the value, value).
    """
    hit = flag_at(tokens, i, flags)
    return (hit[0], hit[1]) if hit else None


def find_flag(tokens: list[str], flags: tuple[str, ...]) -> str | None:
    """The value of the first of flags present in tokens, else None."""
    for i in range(len(tokens)):
        hit = flag_value(tokens, i, flags)
        if hit:
            return hit[1]
    return None


def has_flag(tokens: list[str], flag: str) -> bool:
    want = norm_flag(flag)
    return any(split_flag(t)[1] == want for t in tokens)


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
    return value.split(":", 1)[0] if "://" not in value else value


def quant_tag(value: str) -> str | None:
    """``org/name:Q4_K_M`` → ``Q4_K_M``."""
    if "://" in value or ":" not in value:
        return None
    tag = value.split(":", 1)[1]
    return tag if re.match(r"^[A-Za-z0-9_.-]+$", tag) else None


def model_uri(value: str, revision: str | None = None) -> str | None:
    """The normalized source URI when a flag/env value names a fetchable model."""
    uri = value if "://" in value else hub_id_to_uri(value)
    if uri is None:
        return None
    try:
        source = parse_model_uri(uri)
    except ModelSourceError:
        return None
    if revision and source.is_hub and "@" not in value:
        source = ModelSource(source.scheme, source.location, revision)
    return source.uri


def unresolved_var(value: str) -> str | None:
    """The variable a model value is made of when it could not be resolved, else None."""
    m = re.fullmatch(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", value)
    return (m.group(1) or m.group(2)) if m else None


@dataclass(frozen=True)
class Found:
    """One model reference in one container."""

    role: str  # base | tokenizer | lora | draft
    value: str  # the value as the container gives it (vars resolved)
    uri: str
    where: str  # e.g. "args --model", "env MODEL_ID"
    quant: str | None = None  # llama.cpp -hf repo:QUANT
    hf_file: str | None = None  # llama.cpp --hf-file


@dataclass(frozen=True)
class ContainerFacts:
    """Everything admission needs to know about one app container, computed once."""

    name: str
    image: str
    framework: Framework | None
    tokens: tuple[str, ...]
    script_at: int | None
    env: dict[str, str] = field(hash=False)
    env_names: frozenset[str]
    has_env_from: bool
    found: tuple[Found, ...]
    #: a model position holds a variable we cannot resolve (e.g. set through envFrom)
    unresolved: tuple[str, ...]
    cache_dir_flag: str | None
    multi_node: bool
    ray_worker: bool

    @property
    def framework_name(self) -> str:
        return self.framework.name if self.framework else "unknown"


def _lora_values(fw: Framework, tokens: list[str]) -> list[tuple[str, str]]:
    """(value, where) of every LoRA adapter named by ``--lora-modules`` in both forms:
    ``name=ref`` and JSON ``{"name": ..., "path": ref}`` (one or more values per flag)."""
    values: list[tuple[str, str]] = []
    wanted = {norm_flag(f): f for f in fw.lora_flags}
    for i, token in enumerate(tokens):
        _, name, eq, value = split_flag(token)
        flag = wanted.get(name)
        if flag is None:
            continue
        if eq:
            values.append((value, flag))
            continue
        j = i + 1
        while j < len(tokens) and not tokens[j].startswith("-"):
            values.append((tokens[j], flag))
            j += 1
    out: list[tuple[str, str]] = []
    for v, flag in values:
        if v.startswith("{"):
            try:
                obj = json.loads(v)
            except ValueError:
                continue
            path = obj.get("path") if isinstance(obj, dict) else None
            if isinstance(path, str):
                out.append((path, f"{flag} json"))
        else:
            out.append((v.split("=", 1)[1] if "=" in v else v, flag))
    return out


def _draft_values(fw: Framework, tokens: list[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    value = find_flag(tokens, fw.draft_flags)
    if value:
        out.append((value, fw.draft_flags[0]))
    raw = find_flag(tokens, fw.draft_json_flags)
    if raw:
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        model = obj.get("model") if isinstance(obj, dict) else None
        if isinstance(model, str):
            out.append((model, f"{fw.draft_json_flags[0]} model"))
    return out


def _int_flag(tokens: list[str], flags: tuple[str, ...]) -> int:
    value = find_flag(tokens, flags)
    try:
        return int(value) if value is not None else 1
    except ValueError:
        return 1


def _multi_node(container: Container, tokens: list[str], labels: dict[str, Any]) -> bool:
    if any(k.startswith("leaderworkerset.sigs.k8s.io/") for k in labels):
        return True
    if find_flag(tokens, ("--distributed-executor-backend",)) == "ray":
        return True
    if _int_flag(tokens, ("--pipeline-parallel-size", "-pp")) > 1:
        return True
    return _int_flag(tokens, ("--nnodes",)) > 1


def _ray_worker(tokens: list[str]) -> bool:
    for i, token in enumerate(tokens[:-1]):
        if basename(token) == "ray" and tokens[i + 1] == "start":
            return "--head" not in tokens[i + 2 :]
    return False


def _base_values(container: Container, fw: Framework, tokens: list[str]) -> list[Found | str]:
    """Base-model values (or raw unresolved values, as str) in argv and env, in order."""
    out: list[Found | str] = []
    env = env_values(container)
    revision = find_flag(tokens, fw.revision_flags) or next(
        (env[n] for n in fw.revision_env if env.get(n)), None
    )

    def add(value: str, where: str, quant: str | None = None, hf_file: str | None = None) -> None:
        uri = model_uri(hub_repo_id(value), revision)
        if uri:
            out.append(Found("base", value, uri, where, quant, hf_file))
        elif unresolved_var(value):
            out.append(value)

    idx = serve_positional_index(container, fw, tokens)
    if idx is not None:
        add(tokens[idx], "serve")
    hf_file = find_flag(tokens, fw.hub_file_flags) if fw.hub_file_flags else None
    for i in range(len(tokens)):
        hit = flag_value(tokens, i, fw.model_flags)
        if hit:
            add(hit[1], fw.model_flags[0])
        hit = flag_value(tokens, i, fw.hub_repo_flags)
        if hit:
            add(hit[1], "--hf-repo", quant_tag(hit[1]), hf_file)
    for name in fw.model_env:
        raw = next(
            (e.get("value") for e in container.get("env") or [] if e.get("name") == name), None
        )
        if isinstance(raw, str) and raw:
            add(env.get(name, raw), f"env {name}")
    return out


def read_container(container: Container, labels: dict[str, Any] | None = None) -> ContainerFacts:
    """The facts of one app container (see ``ContainerFacts``)."""
    env = env_values(container)
    argv = [expand_k8s(t, env) for t in container_argv(container)]
    at = script_index(argv)
    if at is not None:
        tokens = argv[:at] + split_script(expand_shell(argv[at], env)) + argv[at + 1 :]
    else:
        tokens = argv
    fw = identify_framework(container, tokens)
    found: list[Found] = []
    unresolved: list[str] = []
    if fw is not None:
        for item in _base_values(container, fw, tokens):
            if isinstance(item, str):
                unresolved.append(item)
            else:
                found.append(item)
        base = next((f for f in found if f.role == "base"), None)
        tokenizer = find_flag(tokens, fw.tokenizer_flags)
        tok_rev = find_flag(tokens, ("--tokenizer-revision",)) if fw is VLLM else None
        tok_uri = model_uri(tokenizer, tok_rev) if tokenizer else None
        same_repo = (
            base is not None
            and tokenizer is not None
            and (hub_repo_id(tokenizer) == hub_repo_id(base.value))
        )
        if tokenizer and tok_uri and not same_repo:
            found.append(Found("tokenizer", tokenizer, tok_uri, fw.tokenizer_flags[0]))
        for value, where in _lora_values(fw, tokens):
            uri = model_uri(value)
            if uri:
                found.append(Found("lora", value, uri, where))
        for value, where in _draft_values(fw, tokens):
            uri = model_uri(value)
            if uri:
                found.append(Found("draft", value, uri, where))
        for name in fw.lora_env:
            for part in (env.get(name) or "").split(","):
                uri = model_uri(part.strip()) if part.strip() else None
                if uri:
                    found.append(Found("lora", part.strip(), uri, f"env {name}"))
    cache_flag = find_flag(tokens, fw.cache_dir_flags) if fw and fw.cache_dir_flags else None
    return ContainerFacts(
        name=str(container.get("name")),
        image=str(container.get("image") or ""),
        framework=fw,
        tokens=tuple(tokens),
        script_at=at,
        env=env,
        env_names=frozenset(env_names(container)),
        has_env_from=bool(container.get("envFrom")),
        found=tuple(found),
        unresolved=tuple(unresolved),
        cache_dir_flag=cache_flag,
        multi_node=_multi_node(container, tokens, labels or {}),
        ray_worker=_ray_worker(tokens),
    )


@dataclass(frozen=True)
class Detected:
    container: str
    framework: str
    where: str
    value: str
    uri: str
    role: str = "base"


def detect_container(container: Container) -> list[Detected]:
    facts = read_container(container)
    return [
        Detected(facts.name, facts.framework_name, f.where, f.value, f.uri, f.role)
        for f in facts.found
    ]


def name_models(uris: list[str]) -> list[NamedModel]:
    """Models for these URIs, named by their last path segment; a clash gets ``-2``, ``-3``."""
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
    return models


def detect_models(spec: dict[str, Any]) -> tuple[list[NamedModel], list[Detected]]:
    """Models the app containers load (base models first), deduplicated by URI."""
    detected: list[Detected] = []
    for container in app_containers(spec):
        detected.extend(detect_container(container))
    uris: list[str] = []
    for role in ROLES:
        for d in detected:
            if d.role == role and d.uri not in uris:
                uris.append(d.uri)
    return name_models(uris), detected


def references(model: NamedModel, raw_values: list[str]) -> tuple[str, ...]:
    """Strings an app container may use to name this model."""
    refs: list[str] = [model.source.uri]
    if model.source.uri.endswith("/"):
        refs.append(model.source.uri.rstrip("/"))
    if model.source.hub_id:
        refs.append(model.source.hub_id)
        refs.append(f"hf://{model.source.hub_id}")
        if model.source.revision and model.source.revision != DEFAULT_HF_REVISION:
            refs.append(f"hf://{model.source.hub_id}@{model.source.revision}")
    for raw in raw_values:
        base = hub_repo_id(raw)
        if (
            model_uri(raw) == model.source.uri
            or model_uri(base) == model.source.uri
            or (model.source.hub_id and base == model.source.hub_id)
        ):
            refs.append(raw)
    out: list[str] = []
    for r in refs:
        if r and r not in out:
            out.append(r)
    # longest first, so a reference that is a prefix of another never wins
    return tuple(sorted(out, key=len, reverse=True))
