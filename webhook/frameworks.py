"""What modelcache knows about each serving framework: flags, env, cache locations, versions.

One table per fact, so detection, delivery and rewrites read the same facts:

* ``Framework``: where a server takes its model (flags, env), how it names it to clients,
  where extra models hide (LoRA adapters, draft models, tokenizers), which revision flag
  pins it, and whether it reads Hub models through a Hugging Face client (then the model is
  delivered in the Hugging Face cache layout and its command line is left alone);
* ``FLAG_SINCE``: the release each flag modelcache may add appeared in, and where that fact
  comes from. A flag is added only when the image's version (parsed from its tag) is known to
  accept it, or when every release accepts it; a custom image with an unknown tag gets no
  version-dependent flag (``flag_accepted``);
* ``image_hub_default``: where an image's Hugging Face client caches when the container sets
  nothing (the image's own ``ENV``), for the images whose default is not the user's home.

Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final


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
    hub_file_flags: tuple[str, ...] = ()
    revision_flags: tuple[str, ...] = ()
    revision_env: tuple[str, ...] = ()
    #: flags whose value is a Hugging Face cache directory (vLLM ``--download-dir``)
    cache_dir_flags: tuple[str, ...] = ()
    #: ``--lora-modules name=ref ...`` / JSON objects with ``name`` and ``path``
    lora_flags: tuple[str, ...] = ()
    lora_env: tuple[str, ...] = ()
    #: draft models: ``--speculative-model X`` and JSON ``--speculative-config {"model": X}``
    draft_flags: tuple[str, ...] = ()
    draft_json_flags: tuple[str, ...] = ()
    #: reads Hub models through a Hugging Face client (huggingface_hub / transformers)
    hub_client: bool = False


VLLM: Final = Framework(
    "vllm",
    ("--model",),
    ("--tokenizer",),
    "--served-model-name",
    serve_positional=True,
    revision_flags=("--revision",),
    cache_dir_flags=("--download-dir",),
    lora_flags=("--lora-modules",),
    draft_flags=("--speculative-model",),
    draft_json_flags=("--speculative-config",),
    hub_client=True,
)
SGLANG: Final = Framework(
    "sglang",
    ("--model-path", "--model"),
    ("--tokenizer-path",),
    "--served-model-name",
    revision_flags=("--revision",),
    cache_dir_flags=("--download-dir",),
    lora_flags=("--lora-paths",),
    draft_flags=("--speculative-draft-model-path",),
    hub_client=True,
)
TGI: Final = Framework(
    "tgi",
    ("--model-id",),
    (),
    None,
    ("MODEL_ID",),
    revision_flags=("--revision",),
    revision_env=("REVISION",),
    lora_env=("LORA_ADAPTERS",),
    hub_client=True,
)
LLAMACPP: Final = Framework(
    "llama.cpp",
    ("-m", "--model"),
    (),
    "--alias",
    hub_repo_flags=("--hf-repo", "-hfr", "-hf"),
    hub_file_flags=("--hf-file", "-hff"),
)
#: KServe's huggingfaceserver (``python -m huggingfaceserver --model_id=org/name``)
KSERVE_HF: Final = Framework(
    "kserve-huggingfaceserver",
    ("--model_id",),
    (),
    None,
    revision_flags=("--model_revision",),
    hub_client=True,
)
NIM: Final = Framework("nim", (), (), None, ("NIM_MODEL_PATH",), "NIM_SERVED_MODEL_NAME")
OLLAMA: Final = Framework("ollama", ())
#: Ray Serve applications name their model in the Serve config, not in the pod.
RAY_SERVE: Final = Framework("ray-serve", (), hub_client=True)
#: For containers of an unknown framework when the model comes from the annotation.
GENERIC: Final = Framework("generic", ("--model", "--model-path", "--model-id"))
FRAMEWORKS: Final = (VLLM, SGLANG, TGI, LLAMACPP, KSERVE_HF, NIM, OLLAMA, RAY_SERVE)

Version = tuple[int, ...]

#: (framework, flag) → the first release that accepts it (None: every release does), and the
#: source of that fact. Only flags modelcache may add are listed; anything else is refused.
FLAG_SINCE: Final[dict[tuple[str, str], tuple[Version | None, str]]] = {
    # vLLM: the OpenAI server has had --served-model-name since v0.2.2 (changelog of v0.2.2,
    # "OpenAI server: --served-model-name"); the oldest image in common use is v0.2.7.
    ("vllm", "--served-model-name"): ((0, 2, 2), "vLLM v0.2.2 release notes"),
    # SGLang's server_args has had --served-model-name since its first tagged releases.
    ("sglang", "--served-model-name"): (None, "SGLang server_args since v0.1"),
    # llama.cpp's server has had --alias since the server example first shipped (2023).
    ("llama.cpp", "--alias"): (None, "llama.cpp examples/server README since 2023"),
    ("llama.cpp", "-m"): (None, "llama.cpp common args since the first release"),
}

_TAG_VERSION: Final = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


def image_version(image: str) -> Version | None:
    """The release in an image tag (``vllm/vllm-openai:v0.8.5`` → (0, 8, 5)), or None for a
    digest-only, ``latest`` or custom tag."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    m = _TAG_VERSION.match(last.split(":", 1)[1])
    if not m:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


def flag_accepted(framework: str, flag: str, image: str) -> bool:
    """Whether every release in this image's tag accepts ``flag`` (see ``FLAG_SINCE``)."""
    entry = FLAG_SINCE.get((framework, flag))
    if entry is None:
        return False
    since = entry[0]
    if since is None:
        return True
    version = image_version(image)
    return version is not None and version >= since


#: Images whose Hugging Face cache is not under the user's home: their own ``ENV``.
#: TGI's Dockerfile sets ``HF_HOME=/data`` (2.x and later; 1.x set ``HUGGINGFACE_HUB_CACHE``
#: to ``/data`` itself); KServe's huggingfaceserver image sets ``HF_HOME=/tmp/huggingface``
#: (its Dockerfile, "a writable Hugging Face home folder") and runs as uid 1000.
#: Ray's images (``rayproject/ray*``) run as uid 1000 with ``HOME=/home/ray``.
_IMAGE_HUB_DEFAULTS: Final = (
    ("text-generation-inference", "/data/hub"),
    ("huggingfaceserver", "/tmp/huggingface/hub"),
    ("rayproject/ray", "/home/ray/.cache/huggingface/hub"),
)


def image_hub_default(image: str) -> str | None:
    """Where this image's Hugging Face client caches by default, when the image says so.

    An image's own ``HF_HOME`` beats the pod's ``HOME`` (the client reads ``HF_HOME`` first),
    so this is consulted before ``HOME`` and ``XDG_CACHE_HOME`` from the pod's env."""
    lowered = image.lower()
    for needle, path in _IMAGE_HUB_DEFAULTS:
        if needle in lowered:
            if needle == "text-generation-inference":
                version = image_version(image)
                if version is not None and version < (2,):
                    return "/data"
            return path
    return None
