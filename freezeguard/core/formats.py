"""Upload keys in other formats, mapped to diffusers names with the field's own converters.

People upload what their trainer wrote: kohya / OneTrainer LoRAs (``lora_unet_input_blocks_4_1_...``),
ai-toolkit, XLabs or BFL Flux LoRAs, single files in the original layout
(``model.diffusion_model.input_blocks...``), native LyCORIS files (``lycoris_...``). A loader
converts them before loading, so the audit converts them the same way:

* LoRA formats: the pipeline's own ``lora_state_dict`` (``diffusers.loaders.lora_pipeline``), which
  is what ``load_lora_weights`` calls, and which dispatches to ``diffusers.loaders.lora_conversion_utils``;
* original-layout single files: ``diffusers.loaders.single_file_utils`` (``convert_ldm_unet_checkpoint``,
  ``convert_sd3_transformer_checkpoint_to_diffusers``, ``convert_flux_transformer_checkpoint_to_diffusers``),
  what ``from_single_file`` calls; the SD3 and Flux ones assume full-size shapes;
* native LyCORIS names (no library converts them): ``lycoris_`` + the module path with ``.`` -> ``_``,
  and the same for ``lora_unet_`` names diffusers leaves (LyCORIS algorithms trained through
  kohya's sd-scripts, kohya files mixing naming schemes).

A converter gets only the keys nothing else explained. Which input keys it consumed is read from
what it did to its input (a popped key) or from its output (the same tensor object passed
through); a key no converter consumed stays *unmapped* (cannot verify). diffusers is imported
only here, lazily: without it these formats cannot be verified, and the report says so.

Example:
    >>> family_of({"conv_in.weight": (1,), "down_blocks.0.resnets.0.conv1.weight": (1,)})
    'unet'
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

__all__ = ["OTHER_PART_PREFIXES", "OTHER_PART_KEYS", "family_of", "unet_config_from_layout", "convert_foreign", "peft_targets"]

#: Key prefixes of pipeline parts a denoiser mask does not cover, -> the part's name. Diffusers
#: pipeline LoRAs, kohya/LyCORIS text-encoder modules and original-layout single files.
OTHER_PART_PREFIXES = {
    "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2", "text_encoder_3.": "text_encoder_3",
    "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3", "lycoris_te_": "text_encoder", "lycoris_te1_": "text_encoder",
    "lycoris_te2_": "text_encoder_2", "cond_stage_model.": "text_encoder", "conditioner.": "text_encoder",
    "text_encoders.": "text_encoder", "first_stage_model.": "vae", "vae.": "vae",
    # textual-inversion embeddings OneTrainer bundles into its LoRA files (convert_sdxl_lora.py: bundle_emb)
    "bundle_emb.": "text_encoder",
}

# Top-level modules of BFL's Flux (flux/model.py), whose releases carry no prefix.
_BFL_FLUX_TOP = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
                 "final_layer")

#: Whole keys of original (CompVis ldm) checkpoints that no denoiser loads: the DDPM schedule
#: (ldm/models/diffusion/ddpm.py, DDPM.register_schedule) and the EMA's bookkeeping (ldm/modules/ema.py,
#: LitEma: decay, num_updates). The sampler of the original code reads the schedule: a part of its own.
OTHER_PART_KEYS = dict.fromkeys(
    ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
     "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
     "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
     "lvlb_weights", "logvar"), "scheduler") | {"model_ema.decay": "ema", "model_ema.num_updates": "ema"}

Reading = tuple[str, dict[str, torch.Tensor], dict[str, str]]  # (format, converted, new key -> source key)


def family_of(layout: Mapping[str, Any]) -> str | None:
    """``"sdxl"``, ``"unet"`` (SD-1.x/2.x), ``"flux"``, ``"sd3"`` or None, from a mask's layout."""
    names = set(layout)
    if "conv_in.weight" in names and any(n.startswith("down_blocks.") for n in names):
        return "sdxl" if "add_embedding.linear_1.weight" in names else "unet"
    if any(n.startswith("single_transformer_blocks.") for n in names) and "x_embedder.weight" in names:
        return "flux"
    if "pos_embed.proj.weight" in names and "context_embedder.weight" in names:
        return "sd3"
    return None


def unet_config_from_layout(layout: Mapping[str, Any]) -> dict[str, Any]:
    """The config entries diffusers' UNet converters read, derived from the released names.

    Example:
        >>> names = ["down_blocks.0.resnets.0.conv1.weight", "down_blocks.0.resnets.1.conv1.weight"]
        >>> unet_config_from_layout(dict.fromkeys(names, (1,)))["layers_per_block"]
        2
    """
    resnets = {n.split(".")[3] for n in layout if n.startswith("down_blocks.0.resnets.")}
    return {"layers_per_block": len(resnets) or 1, "class_embed_type": None, "num_class_embeds": None,
            "addition_embed_type": "text_time" if "add_embedding.linear_1.weight" in layout else None}


@contextlib.contextmanager
def _quiet_diffusers():
    # The converters log (and warn) about every format they detect; the report says it instead.
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_METADATA = {"shape", "dtype", "device", "dim", "size", "numel", "ndim", "requires_grad", "is_floating_point",
             "element_size", "__len__", "layout", "is_cuda", "is_meta", "data_ptr", "__hash__", "__repr__",
             "__format__", "__bool__", "names", "__get__", "nelement", "ndimension"}


class _Tracked(torch.Tensor):
    """A tensor that notes when a converter computes with it (not when it only looks at its shape)."""

    _fg_used: set[str]
    _fg_key: str

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in _METADATA:
            for a in _flat(args) + _flat(list((kwargs or {}).values())):
                if isinstance(a, _Tracked):
                    a._fg_used.add(a._fg_key)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _flat(items) -> list:
    out = []
    for a in items:
        if isinstance(a, (list, tuple)):
            out += _flat(a)
        else:
            out.append(a)
    return out


def _run(convert: Callable[[dict], dict], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str], set[str]]:
    """Run a converter; (output, new key -> source key, source keys consumed).

    A source key is consumed when the converter computed with its tensor (a scale, a concat, a
    split) or passed the tensor through to its output. A key it only looked at, never touched, or
    popped and dropped is not: diffusers would not load it, but another loader may (diffusers drops
    kohya SGM keys that sit beside diffusers-named ones, which ComfyUI loads), so it stays unmapped.
    """
    used: set[str] = set()
    given = {}
    for k, v in tensors.items():
        t = v.as_subclass(_Tracked)
        t._fg_used, t._fg_key = used, k
        given[k] = t
    by_id = {id(v): k for k, v in given.items()}
    out = convert(given)
    # a key handed back under its own name was not converted: it stays the caller's to place
    out = {new: v for new, v in out.items() if by_id.get(id(v)) != new}
    sources = {new: by_id[id(v)] for new, v in out.items() if id(v) in by_id}
    consumed = set(sources.values()) | used
    plain = {new: (v.as_subclass(torch.Tensor) if isinstance(v, _Tracked) else v) for new, v in out.items()}
    return plain, sources, consumed


def _lora_loader(family: str):
    from diffusers.loaders import lora_pipeline as lp

    return {"unet": lp.StableDiffusionLoraLoaderMixin, "sdxl": lp.StableDiffusionXLLoraLoaderMixin,
            "flux": lp.FluxLoraLoaderMixin, "sd3": lp.SD3LoraLoaderMixin}[family]


def _read_lora(family: str, layout: Mapping[str, Any]) -> Callable[[dict], dict]:
    from diffusers.configuration_utils import FrozenDict
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    loader = _lora_loader(family)
    kwargs = {"unet_config": FrozenDict(unet_config_from_layout(layout))} if family in ("unet", "sdxl") else {}

    def convert(sd: dict) -> dict:
        out = loader.lora_state_dict(sd, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        # then, as the model's load_lora_adapter does (diffusers.loaders.peft), old attention-processor
        # names (``attn1.processor.to_q_lora.down``) become peft's (``attn1.to_q.lora_A``)
        if out and not any("lora_A" in k for k in out) and not any(".lokr_" in k for k in out):
            out = convert_unet_state_dict_to_peft(out)
        return out
    return convert


def _read_single_file(family: str, layout: Mapping[str, Any]) -> Callable[[dict], dict]:
    from diffusers.loaders import single_file_utils as sfu

    if family in ("unet", "sdxl"):
        config = unet_config_from_layout(layout)
        return lambda sd: sfu.convert_ldm_unet_checkpoint(sd, config)
    if family == "flux":
        return sfu.convert_flux_transformer_checkpoint_to_diffusers
    return sfu.convert_sd3_transformer_checkpoint_to_diffusers


def _flat_names(layout: Mapping[str, Any]) -> dict[str, str | None]:
    """Released module path with "." -> "_" -> the path (None where two modules flatten alike)."""
    modules = {".".join(n.split(".")[:i]) for n in layout for i in range(1, len(n.split(".")))}
    flat: dict[str, str | None] = {}
    for m in modules:
        f = m.replace(".", "_")
        flat[f] = None if f in flat and flat[f] != m else m
    return flat


def _rename_block(key: str, prefix: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        if key.startswith(prefix + old):
            return prefix + new + key[len(prefix + old):]
    return key


def _read_ema(layout: Mapping[str, Any], file_keys: Iterable[str]) -> Callable[[dict], dict]:
    """The EMA copy an original checkpoint keeps (LitEma: ``model_ema.`` + the parameter name without
    dots), as ``from_single_file(..., extract_ema=True)`` loads it (convert_ldm_unet_checkpoint)."""
    from diffusers.loaders import single_file_utils as sfu

    config = unet_config_from_layout(layout)
    names = [k for k in file_keys if k.startswith(sfu.LDM_UNET_KEY)]

    def convert(sd: dict) -> dict:
        # the converter walks the main keys to find their EMA twins: stand-ins, never output
        stand_in = torch.empty(0, device="meta")
        checkpoint = dict.fromkeys(names, stand_in)
        checkpoint.update(sd)
        out = sfu.convert_ldm_unet_checkpoint(checkpoint, config, extract_ema=True)
        return {k: v for k, v in out.items() if v is not None and v is not stand_in}
    return convert


def _read_flat(layout: Mapping[str, Any], prefix: str, family: str | None = None) -> Callable[[dict], dict]:
    """``<prefix><module path with _>.<rest>`` -> ``<module>.<rest>``.

    Native LyCORIS files use the prefix ``lycoris_`` (lycoris/wrapper.py, LycorisNetwork.LORA_PREFIX);
    LyCORIS and LoRA networks trained through kohya's sd-scripts use ``lora_unet_`` (lycoris/kohya.py,
    LORA_PREFIX_UNET), over diffusers' module names (SD-1.x) or SGM ones (SDXL: input_blocks...,
    renamed first with diffusers' own ``_maybe_map_sgm_blocks_to_diffusers``).
    """
    flat = _flat_names(layout)

    def convert(sd: dict) -> dict:
        if family == "sdxl" and any(p in k for k in sd for p in ("input_blocks", "middle_block", "output_blocks")):
            from diffusers.configuration_utils import FrozenDict
            from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

            sd = _maybe_map_sgm_blocks_to_diffusers(dict(sd), FrozenDict(unet_config_from_layout(layout)))
            # it renumbers the blocks; the block names follow as in _convert_unet_lora_key
            renames = (("input_blocks_", "down_blocks_"), ("middle_block_", "mid_block_"), ("output_blocks_", "up_blocks_"))
            sd = {_rename_block(k, prefix, renames): v for k, v in sd.items()}
        out = {}
        for key in list(sd):
            head, _, rest = key.partition(".")
            module = flat.get(head.removeprefix(prefix)) if head.startswith(prefix) else None
            if module is not None and rest:
                out[f"{module}.{rest}"] = sd[key]
        return out
    return convert


# OneTrainer's ORIGINAL / COMFY LoRA files and its older OMI/INTERNAL saves name the UNet's modules
# in the original (SGM) layout, dotted: ``[unet.|diffusion_model.]input_blocks.1.1.<...>.to_q.lora_A.weight``
# (Nerogar/OneTrainer modules/modelSaver/mixin/LoRASaverMixin.py, _save_original / _save_comfy; before
# July 2026 modules/util/convert/lora/convert_lora_util.py, convert_to_omi with convert_sd_lora_key_sets'
# "unet" prefix). Flattened to kohya's names, diffusers' kohya converter places them.
_SGM_TOPS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
_SGM_WRAPPERS = ("unet.", "diffusion_model.", "")
_AB_TO_KOHYA = ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"),
                (".lora_down.weight", ".lora_down.weight"), (".lora_up.weight", ".lora_up.weight"),
                (".alpha", ".alpha"), (".dora_scale", ".dora_scale"))


def _sgm_module_key(key: str) -> str | None:
    """``[unet.|diffusion_model.]<SGM module>.<LoRA suffix>`` -> kohya's ``lora_unet_<module with _>.<suffix>``.

    Example:
        >>> _sgm_module_key("diffusion_model.input_blocks.1.1.proj_in.lora_A.weight")
        'lora_unet_input_blocks_1_1_proj_in.lora_down.weight'
    """
    for wrapper in _SGM_WRAPPERS:
        body = key.removeprefix(wrapper)
        if body != key or not wrapper:
            break
    if not body.startswith(_SGM_TOPS):
        return None
    for suffix, kohya in _AB_TO_KOHYA:
        if body.endswith(suffix):
            return "lora_unet_" + body[: -len(suffix)].replace(".", "_") + kohya
    return None


def _read_sgm_dotted(family: str, layout: Mapping[str, Any]) -> Callable[[dict], dict]:
    lora = _read_lora(family, layout)

    def convert(sd: dict) -> dict:
        renamed = {_sgm_module_key(k): v for k, v in sd.items()}
        renamed.pop(None, None)
        return lora(renamed) if renamed else {}
    return convert


def convert_foreign(keys: list[str], tensors: Mapping[str, torch.Tensor], family: str | None,
                    layout: Mapping[str, Any]) -> tuple[list[Reading], list[str], list[tuple[str, str]]]:
    """Map ``keys`` (which name nothing released) through the converters for ``family``.

    Returns the readings that consumed keys, the keys none consumed, and problems
    (``(what, reason)``, e.g. diffusers missing). Tensors are read from ``tensors`` only for the
    keys given.
    """
    left = list(keys)
    readings: list[Reading] = []
    problems: list[tuple[str, str]] = []
    steps: list[tuple[str, Callable[[], Callable[[dict], dict]], Callable[[str], bool]]] = [
        ("lycoris", lambda: _read_flat(layout, "lycoris_"), lambda k: k.startswith("lycoris_"))]
    if family is not None:
        steps.append(("single file (diffusers single_file_utils)", lambda: _read_single_file(family, layout),
                      lambda k: k.startswith("model.diffusion_model.")
                      or (family == "flux" and k.split(".")[0] in _BFL_FLUX_TOP)))
    if family in ("unet", "sdxl"):
        steps.append(("OneTrainer original-layout LoRA names", lambda: _read_sgm_dotted(family, layout),
                      lambda k: _sgm_module_key(k) is not None))
    if family is not None:
        steps.append(("LoRA (diffusers lora_state_dict)", lambda: _read_lora(family, layout),
                      lambda k: any(w in k.lower() for w in ("lora", "lokr", "hada", "loha", "alpha", "dora"))))
    if family in ("unet", "sdxl"):
        steps.append(("EMA copy (single_file_utils, extract_ema)", lambda: _read_ema(layout, tensors.keys()),
                      lambda k: k.startswith("model_ema.")))
    if family in ("unet", "sdxl"):  # what diffusers leaves of a kohya file (LyCORIS algorithms, mixed names)
        steps.append(("kohya module names", lambda: _read_flat(layout, "lora_unet_", family),
                      lambda k: k.startswith("lora_unet_")))
    for name, make, wanted in steps:
        subset = [k for k in left if wanted(k)]
        if not subset:
            continue
        try:
            convert = make()
        except ImportError as exc:
            problems.append((name, f"diffusers is needed to read this format: {exc}"))
            continue
        try:
            with _quiet_diffusers():
                out, sources, consumed = _run(convert, {k: tensors[k] for k in subset})
        except Exception:  # noqa: BLE001 - a converter that rejects the keys: they stay unmapped
            continue
        if not consumed or not out:
            continue
        readings.append((name, out, sources))
        left = [k for k in left if k not in consumed]
    return readings, left, problems


def peft_targets(adapter_config: Path, modules: Iterable[str]) -> set[str] | None:
    """The released modules peft's loader puts the adapter of ``adapter_config.json`` on.

    Some tuners keep state shared by all their layers at the model's root (VeRA's ``vera_A``,
    VB-LoRA's vector bank, UniLoRA's ``theta_d``, ...); which modules use it is in the config,
    matched by peft's own ``check_target_module_exists``. ``"all-linear"`` (resolved by peft
    against the live model) is taken as every module. None when peft is missing or the config
    cannot be read.
    """
    try:
        from peft import PeftConfig
        from peft.tuners.tuners_utils import check_target_module_exists
    except ImportError:
        return None
    try:
        config = PeftConfig.from_pretrained(str(Path(adapter_config).parent))
    except Exception:  # noqa: BLE001 - an unreadable config: the caller reports it
        return None
    modules = [m for m in modules if m]
    if getattr(config, "target_modules", None) == "all-linear":
        return set(modules)
    found = set()
    # LoRA on parameters (peft's target_parameters): the module owning a named parameter is adapted
    for param in getattr(config, "target_parameters", None) or ():
        found |= {m for m in modules if f"{m}.{param.rsplit('.', 1)[-1]}".endswith(param)
                  and (m == param.rsplit(".", 1)[0] or m.endswith("." + param.rsplit(".", 1)[0]))}
    for m in modules:
        try:
            if bool(check_target_module_exists(config, m)):
                found.add(m)
        except Exception:  # noqa: BLE001 - a config peft cannot match: every module, to stay safe
            return set(modules)
    return found
