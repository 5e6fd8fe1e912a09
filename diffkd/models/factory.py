"""``create_model``: the CIFAR zoo by the benchmark's names, anything else from timm by full name and tag."""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from diffkd.models.checkpoint import load_checkpoint
from diffkd.models.cifar import CIFAR_BUILDERS

CIFAR_DEFAULT_NUM_CLASSES = 100
# timm's weight files on the Hugging Face hub, in the order timm itself tries them.
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def list_cifar_models() -> list[str]:
    """The CIFAR zoo's names, spelled as in the benchmark (case matters: ``resnet8x4``, ``MobileNetV2``)."""
    return list(CIFAR_BUILDERS)


def _unknown_name_error(name: str, timm_names: list[str]) -> ValueError:
    candidates = list_cifar_models() + timm_names
    by_lower = {candidate.lower(): candidate for candidate in candidates}
    # Names that extend what was typed ('mobilenetv1' → 'mobilenetv1_100') first, then similar spellings.
    extensions = sorted((candidate for candidate in candidates if candidate.lower().startswith(name.lower())),
                        key=lambda candidate: (len(candidate), candidate))
    similar = [by_lower[match] for match in difflib.get_close_matches(name.lower(), list(by_lower), n=4, cutoff=0.6)]
    close = list(dict.fromkeys(extensions[:2] + similar))[:4]
    suggestion = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ValueError(f"unknown model name {name!r}.{suggestion} CIFAR zoo: {', '.join(list_cifar_models())}; "
                      f"any timm model name is accepted too, with an optional pretrained tag "
                      f"(e.g. 'resnet34.tv_in1k', 'mobilenetv1_100'; see timm.list_models()).")


def _cached_timm_weights(name: str) -> tuple[Path | None, list[str]]:
    """The locally cached weight file for a timm name/tag, without any network access, and where it looked."""
    import huggingface_hub
    import torch.hub
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained_cfg is None:
        return None, []
    looked = []
    hub_id = pretrained_cfg.hf_hub_id
    if hub_id:
        repo_id, _, revision = hub_id.partition("@")
        filenames = (pretrained_cfg.hf_hub_filename,) if pretrained_cfg.hf_hub_filename else _HF_WEIGHT_FILES
        for filename in filenames:
            looked.append(f"Hugging Face cache: {repo_id}/{filename}")
            cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(cached, str):
                return Path(cached), looked
    if pretrained_cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(pretrained_cfg.url).path)
        looked.append(f"torch hub cache: {cached}")
        if cached.is_file():
            return cached, looked
    return None, looked


def _create_timm_model(name: str, num_classes: int | None, in_chans: int, pretrained: bool,
                       model_kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise _unknown_name_error(name, timm.list_models())
    architecture, _, tag = name.partition(".")
    known_tags = timm.list_pretrained(f"{architecture}.*")
    if tag and name not in known_tags:
        raise ValueError(f"timm has no pretrained tag {tag!r} for {architecture!r}; known: "
                         f"{', '.join(known_tags) or 'none'}")
    kwargs = dict(model_kwargs, in_chans=in_chans)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if pretrained:
        weights, looked = _cached_timm_weights(name)
        if weights is None:
            where = "; ".join(looked) if looked else "timm knows no pretrained weights for this name"
            raise ValueError(
                f"pretrained weights for {name!r} are not in the local cache ({where}), and this code does not "
                f"download them. Put the weights in the cache, or pass the weight file with checkpoint='...' "
                f"(with pretrained=False).")
        # Pointing timm at the cached file keeps it off the network; a file from the Hugging Face cache is a
        # plain state dict even where the original URL needed a custom loader (e.g. .npz ViT weights).
        overlay = {"file": str(weights)}
        if weights.suffix in (".safetensors", ".bin"):
            overlay["custom_load"] = False
        kwargs["pretrained_cfg_overlay"] = overlay
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def create_model(name: str, num_classes: int | None = None, in_chans: int = 3, pretrained: bool = False,
                 checkpoint: str | os.PathLike | None = None, **model_kwargs) -> nn.Module:
    """Build a model by name.

    ``name`` is a CIFAR zoo name (see :func:`list_cifar_models`; ``num_classes`` defaults to 100) or any timm
    model name with an optional pretrained tag, e.g. ``resnet34.tv_in1k`` (``num_classes`` defaults to timm's).
    ``pretrained=True`` (timm only) uses weights already in the local timm / Hugging Face cache and never
    downloads; ``checkpoint`` loads a weight file strictly (see :func:`load_checkpoint`), e.g. a benchmark
    teacher.  ``model_kwargs`` go to timm (e.g. ``img_size=32`` for a ViT).
    """
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True or checkpoint=..., not both: the checkpoint would overwrite "
                         "the pretrained weights")
    if name in CIFAR_BUILDERS:
        if pretrained:
            raise ValueError(f"{name!r} is a CIFAR zoo model: there are no pretrained weights to fetch; pass the "
                             f"benchmark checkpoint file with checkpoint='.../{name}_vanilla/ckpt_epoch_240.pth'")
        if model_kwargs:
            raise ValueError(f"{name!r} is a CIFAR zoo model, which takes only num_classes and in_chans; got "
                             f"extra arguments {sorted(model_kwargs)}")
        num_classes = CIFAR_DEFAULT_NUM_CLASSES if num_classes is None else num_classes
        model = CIFAR_BUILDERS[name](name, num_classes=num_classes, in_chans=in_chans)
    else:
        model = _create_timm_model(name, num_classes, in_chans, pretrained, model_kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=True)
    return model
