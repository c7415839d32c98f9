"""Framework-aware model-path rewrites in the app containers' command, args and env.

Only models delivered by **path** are rewritten (see ``Delivery``); a container that reads
its Hub models in the Hugging Face cache layout keeps its command line byte for byte, and
gets at most ``HF_HUB_CACHE`` when its cache directory came from a default (the image's or
the user's home) rather than from the container itself.

The server loads from ``<mount-path>/<name>`` while clients keep using the original model
name: vLLM and SGLang get ``--served-model-name <original>``, llama.cpp ``--alias``, NIM
``NIM_SERVED_MODEL_NAME`` (each only when the user has not set it, and only where
``webhook.frameworks.flag_accepted`` says the image's release accepts the flag). No offline
switch is ever set: the app may still download what modelcache does not deliver (adapters,
draft models). User-set values are never overwritten, and a value is never rewritten twice:
a rewritten value is a path under the mount, which names no model.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import replace
from typing import Final

from webhook.frameworks import GENERIC, LLAMACPP, VLLM, Framework, flag_accepted
from webhook.mutations.context import Container, Context, ModelRef, Pod
from webhook.mutations.detect import (
    container_argv,
    expand_k8s,
    flag_at,
    has_flag,
    hub_repo_id,
    identify_framework,
    norm_flag,
    quant_tag,
    script_index,
    serve_positional_index,
    split_script,
)

HUB_CACHE_VAR: Final = "HF_HUB_CACHE"
_TOKEN_END: Final = r"(?=$|[\s\"';&|)])"
_TOKEN_START: Final = r"(?<![^\s\"'=])"
_SCRIPT_MODEL_POS: Final = re.compile(
    r"(?:\bserve|--model|--model[-_]path|--model[-_]id|-m|--hf[-_]repo|-hfr|-hf)[\s=]+$"
)


def _match(value: str, ctx: Context) -> tuple[ModelRef, str] | None:
    """The model a flag/env value names, and the rewritten value (subpaths kept)."""
    for ref in ctx.models:
        for r in ref.references:
            if value == r:
                return ref, ctx.model_path(ref.model)
            if value.startswith(r.rstrip("/") + "/") and r.rstrip("/"):
                rest = value[len(r.rstrip("/")) + 1 :]
                return ref, f"{ctx.model_path(ref.model)}/{rest}".rstrip("/")
    return None


_has_flag = has_flag


def _extras(fw: Framework, tokens: list[str], original: str, image: str) -> list[str]:
    """Flags that keep the name clients use, when the image's release accepts them."""
    extra: list[str] = []
    flag = fw.served_name_flag
    if flag and not _has_flag(tokens, flag) and flag_accepted(fw.name, flag, image):
        extra += [flag, original]
    return extra


class _Argv:
    """command + args as one token list, edited in place with positions kept per list."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self.pos: list[tuple[str, int]] = []
        self._reindex()

    def _reindex(self) -> None:
        self.pos = []
        for key in ("command", "args"):
            value = self.container.get(key)
            if isinstance(value, list):
                self.pos += [(key, i) for i, v in enumerate(value) if isinstance(v, str)]

    def tokens(self) -> list[str]:
        return [self.container[k][i] for k, i in self.pos]

    def set(self, at: int, value: str) -> None:
        key, i = self.pos[at]
        self.container[key][i] = value

    def insert_after(self, at: int, values: list[str]) -> None:
        key, i = self.pos[at]
        self.container[key][i + 1 : i + 1] = values
        self._reindex()

    def delete(self, indices: list[int]) -> None:
        """Remove the tokens at these positions (they may span command and args)."""
        for at in sorted(indices, reverse=True):
            key, i = self.pos[at]
            del self.container[key][i]
        self._reindex()

    def field(self, at: int) -> str:
        return self.pos[at][0]


_flag_at = flag_at


def _rewrite_argv(container: Container, fw: Framework, ctx: Context, all_tokens: list[str]) -> int:
    """Rewrite the plain argv (not sh -c scripts); returns the number of model rewrites."""
    name = str(container.get("name"))
    argv = _Argv(container)
    done = 0
    extras_done = False
    i = 0
    while i < len(argv.pos):
        tokens = argv.tokens()
        # recomputed each step: inserting the extra flags shifts the script's position
        if i == script_index(tokens):
            i += 1
            continue
        target: tuple[int, str, str, bool] | None = None  # value idx, value, where, is_model
        if i == serve_positional_index(container, fw, tokens):
            target = (i, tokens[i], "serve", True)
        elif hit := _flag_at(tokens, i, fw.model_flags):
            target = (hit[0], hit[1], hit[2], True)
        elif hit := _flag_at(tokens, i, fw.tokenizer_flags):
            target = (hit[0], hit[1], hit[2], False)
        elif (hit := _flag_at(tokens, i, fw.hub_repo_flags)) and fw is LLAMACPP:
            done += _rewrite_hub_repo(argv, i, hit=hit, ctx=ctx, all_tokens=all_tokens, name=name)
            extras_done = True
            i += 1
            continue
        if target is None:
            i += 1
            continue
        at, value, where, is_model = target
        facts = ctx.facts.get(name)
        m = _match(expand_k8s(value, facts.env) if facts is not None else value, ctx)
        if m is None:
            i = at + 1
            continue
        new = m[1]
        argv.set(at, f"{where}={new}" if at == i and where != "serve" else new)
        ctx.notes.rewrites.append(
            {
                "container": name,
                "field": f"{argv.field(at)} {where}",
                "original": value,
                "value": new,
            }
        )
        done += 1
        if is_model and not extras_done:
            extras_done = True
            extra = _extras(fw, all_tokens, value, str(container.get("image") or ""))
            if extra:
                argv.insert_after(at, extra)
                ctx.notes.added.append(
                    {"container": name, "field": argv.field(at), "value": shlex.join(extra)}
                )
                i = at + 1 + len(extra)
                continue
        i = at + 1
    return done


def _rewrite_hub_repo(
    argv: _Argv,
    i: int,
    *,
    hit: tuple[int, str, str],
    ctx: Context,
    all_tokens: list[str],
    name: str,
) -> int:
    """llama.cpp ``--hf-repo R[:QUANT] [--hf-file F] [--model X]`` → one ``-m <path>/F`` (or
    ``<path>/<QUANT>.gguf``, which the sidecar shows as the quant's file), + ``--alias R``.
    ``--hf-file`` and a ``--model`` save path go: llama.cpp takes one model."""
    at, value, flag = hit
    m = _match(hub_repo_id(value), ctx)
    if m is None:
        return 0
    tokens = argv.tokens()
    hf_file: str | None = None
    drop: list[int] = []
    for j in range(len(tokens)):
        if j in (i, at):
            continue
        fh = _flag_at(tokens, j, ("--hf-file", "-hff"))
        if fh and hf_file is None:
            hf_file = fh[1]
            drop += [j] if fh[0] == j else [j, j + 1]
            continue
        mh = _flag_at(tokens, j, ("-m", "--model"))
        if mh:
            drop += [j] if mh[0] == j else [j, j + 1]
    quant = quant_tag(value) or "Q4_K_M"
    file_name = hf_file or f"{quant}.gguf"
    new = f"{m[1]}/{file_name}"
    # the repo flag becomes -m <path>/<file> in place
    if at == i:
        argv.set(i, f"--model={new}")
    else:
        argv.set(i, "-m")
        argv.set(at, new)
    if not _has_flag(all_tokens, "--alias") and flag_accepted(
        LLAMACPP.name, "--alias", str(argv.container.get("image") or "")
    ):
        extra = ["--alias", value]
        argv.insert_after(at, extra)
        drop = [j + len(extra) if j > at else j for j in drop]
        ctx.notes.added.append(
            {"container": name, "field": argv.field(at), "value": shlex.join(extra)}
        )
    argv.delete(drop)
    field = argv.field(min(at, len(argv.pos) - 1))
    ctx.notes.rewrites.append(
        {"container": name, "field": f"{field} {flag}", "original": value, "value": new}
    )
    if hf_file is not None:
        ctx.notes.rewrites.append(
            {"container": name, "field": f"{field} --hf-file", "original": hf_file, "value": new}
        )
    return 1


def _rewrite_lora(container: Container, fw: Framework, ctx: Context) -> int:
    """vLLM ``--lora-modules name=REF [name=REF ...]``: rewrite each REF naming a model."""
    if fw is not VLLM:
        return 0
    argv = _Argv(container)
    tokens = argv.tokens()
    done = 0
    for i, token in enumerate(tokens):
        if norm_flag(token) != "--lora-modules":
            continue
        j = i + 1
        while j < len(tokens) and not tokens[j].startswith("-"):
            lora, sep, value = tokens[j].partition("=")
            m = _match(value, ctx) if sep else None
            if m is not None:
                argv.set(j, f"{lora}={m[1]}")
                ctx.notes.rewrites.append(
                    {
                        "container": str(container.get("name")),
                        "field": f"{argv.field(j)} --lora-modules",
                        "original": value,
                        "value": m[1],
                    }
                )
                done += 1
            j += 1
    return done


def _rewrite_script(container: Container, fw: Framework, ctx: Context) -> int:
    """Whole-token replacements inside an ``sh -c`` script (the script stays a script)."""
    argv = _Argv(container)
    tokens = argv.tokens()
    at = script_index(tokens)
    if at is None:
        return 0
    script = tokens[at]
    script_tokens = split_script(script)
    done = 0
    extras_done = False
    originals: list[tuple[str, str]] = []
    for ref in ctx.models:
        for r in ref.references:
            pattern = re.compile(_TOKEN_START + re.escape(r) + r"(/[^\s\"';&|)]*)?" + _TOKEN_END)
            pos = 0
            while m := pattern.search(script, pos):
                before = script[: m.start()]
                if re.search(r"(--served[-_]model[-_]name|--alias)[\s=]+$", before):
                    pos = m.end()
                    continue
                new = ctx.model_path(ref.model) + (m.group(1) or "")
                insert = new
                if not extras_done and _SCRIPT_MODEL_POS.search(before):
                    extra = _extras(
                        fw, script_tokens, m.group(0), str(container.get("image") or "")
                    )
                    if extra:
                        insert = f"{new} {shlex.join(extra)}"
                        ctx.notes.added.append(
                            {
                                "container": str(container.get("name")),
                                "field": f"{argv.field(at)} sh -c",
                                "value": shlex.join(extra),
                            }
                        )
                    extras_done = True
                originals.append((m.group(0), new))
                script = script[: m.start()] + insert + script[m.end() :]
                pos = m.start() + len(insert)
                done += 1
    if done:
        argv.set(at, script)
        for original, new in originals:
            ctx.notes.rewrites.append(
                {
                    "container": str(container.get("name")),
                    "field": f"{argv.field(at)} sh -c",
                    "original": original,
                    "value": new,
                }
            )
    return done


def _set_env(container: Container, name: str, value: str) -> bool:
    env = container.get("env")
    if not isinstance(env, list):
        env = []
        container["env"] = env
    if any(isinstance(e, dict) and e.get("name") == name for e in env):
        return False
    env.append({"name": name, "value": value})
    return True


def _rewrite_env(container: Container, fw: Framework, ctx: Context) -> int:
    done = 0
    cname = str(container.get("name"))
    for item in container.get("env") or []:
        if not isinstance(item, dict) or item.get("name") not in fw.model_env:
            continue
        value = item.get("value")
        if not isinstance(value, str):
            continue
        m = _match(value, ctx)
        if m is None:
            continue
        item["value"] = m[1]
        ctx.notes.rewrites.append(
            {"container": cname, "field": f"env {item['name']}", "original": value, "value": m[1]}
        )
        done += 1
        if fw.served_name_env and _set_env(container, fw.served_name_env, value):
            ctx.notes.added.append(
                {"container": cname, "field": f"env {fw.served_name_env}", "value": value}
            )
    return done


def _set_hub_cache(container: Container, ctx: Context) -> None:
    """``HF_HUB_CACHE`` for a hub-cache container whose cache directory came from a default."""
    name = str(container.get("name"))
    if ctx.options.rewrite == "off":
        return
    for d in ctx.deliveries_of(name):
        if d.mode == "hub-cache" and d.set_hub_env and d.hub_dir:
            if _set_env(container, HUB_CACHE_VAR, d.hub_dir):
                ctx.notes.added.append(
                    {"container": name, "field": f"env {HUB_CACHE_VAR}", "value": d.hub_dir}
                )
            return


def rewrite_container(container: Container, ctx: Context) -> int:
    """Rewrite the path-delivered models of one container; returns the number of rewrites."""
    name = str(container.get("name"))
    paths = ctx.path_models(name)
    _set_hub_cache(container, ctx)
    if not paths or ctx.options.rewrite == "off":
        return 0
    facts = ctx.facts.get(name)
    tokens = list(facts.tokens) if facts is not None else container_argv(container)
    fw = (
        facts.framework if facts is not None else identify_framework(container, tokens)
    ) or GENERIC
    view = replace(ctx, models=tuple(r for r in ctx.models if r.model.name in paths))
    view.notes = ctx.notes
    done = _rewrite_argv(container, fw, view, tokens)
    done += _rewrite_lora(container, fw, view)
    done += _rewrite_script(container, fw, view)
    done += _rewrite_env(container, fw, view)
    return done


def _names_mount(container: Container, ctx: Context) -> bool:
    """Whether the container already points at a model under the mount (set by the user)."""
    values = container_argv(container) + [
        str(e.get("value")) for e in container.get("env") or [] if isinstance(e, dict)
    ]
    paths = [ctx.model_path(m) for m in ctx.named_models]
    return any(p in v for v in values for p in paths)


def rewrite_model_args(pod: Pod, ctx: Context) -> Pod:
    """Rewrite every target container; warn for one where no model reference was found."""
    rewritten_before = {r.get("container") for r in ctx.previous_rewrites}
    for container in pod["spec"].get("containers") or []:
        if not isinstance(container, dict) or container.get("name") not in ctx.target_set:
            continue
        done = rewrite_container(container, ctx)
        if (
            done == 0
            and ctx.options.rewrite != "off"
            and ctx.path_models(str(container.get("name")))
            and container.get("name") not in rewritten_before
            and not ctx.previous_added
            and not _names_mount(container, ctx)
        ):
            ctx.notes.warn(
                f"container {container.get('name')}: no model reference to rewrite; models are "
                f"under {ctx.options.mount_path}/"
            )
    return pod
