"""Adapters on disk, in the format Hugging Face peft reads and writes.

An adapter folder holds two files and nothing of the base model:

- ``adapter_model.safetensors``: every A and B, under the key
  ``base_model.model.<module path>.lora_A.weight`` (and ``.lora_B.weight``), and for DoRA each
  magnitude vector under ``base_model.model.<module path>.lora_magnitude_vector``; an adapted
  embedding's under ``base_model.model.<module path>.lora_embedding_A`` (and ``_B``);
- ``adapter_config.json``: ``peft_type``, ``task_type``, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``use_rslora``, ``use_dora``, ``init_lora_weights``, ``target_modules``, ``bias``
  and ``base_model_name_or_path``.

A model holding several named adapters (``lora/named.py``) is saved as peft saves one:
``save_adapters`` writes the adapter ``"default"`` into the folder itself and each other adapter
into a subfolder of its name, each a folder as above; ``load_adapter(..., adapter_name=...)``
loads one under a name, ``load_adapters`` the whole folder.

safetensors stores raw tensors, so loading an adapter never unpickles (never runs) anything.
Loading checks every key and shape before changing the model, and names the tensor or config
field that is wrong. Plain LoRA, rsLoRA, DoRA, PiSSA and embedding adapters load; options this
library does not build (``rank_pattern``, ``modules_to_save``, trained biases, ``fan_in_fan_out``,
inits such as ``olora`` or ``loftq`` that changed the base) are refused with the field named.
One adapter holds one r, alpha and dropout, as peft's config does.
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora.atomic import replace_folder_atomically
from lora.dora import DoRALinear, magnitude_key
from lora.embedding import LoRAEmbedding
from lora.inject import adapted_modules, inject_lora
from lora.layer import LoRALinear, check_hyperparameters
from lora.named import DEFAULT, adapter_active, adapter_layers, adapter_names, new_adapter
from lora.pissa import pissa_to_lora, pissa_to_lora_config
from lora.targets import candidate_modules, find_targets, matches_target, short_names

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# peft wraps the model twice (PeftModel.base_model is a LoraModel, whose .model is yours).
KEY_PREFIX = "base_model.model."

# peft config fields that change what the weights mean, and the values this library loads (those of
# plain LoRA; use_rslora, use_dora and init_lora_weights are read and checked on their own).
PLAIN_LORA = {
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "layers_to_transform": (None, []),
    "exclude_modules": (None, []),
}
# peft's init_lora_weights values that only say how A and B started (the file holds what they are
# now), and "pissa", which also changed W (the SVD is taken again when loading). Others, such as
# "olora", "loftq" or "pissa_niter_16", changed W in ways this library does not redo.
LOADABLE_INITS = (True, False, None, "gaussian", "orthogonal", "eva", "pissa")


def adapter_key(module_name: str, matrix: str) -> str:
    """peft's file key of ``matrix`` ("lora_A" or "lora_B") of the LoRA layer at ``module_name``."""
    return f"{KEY_PREFIX}{module_name}.{matrix}.weight"


def layer_tensors(name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of the LoRA module ``layer`` at ``name``, under peft's file keys."""
    if isinstance(layer, LoRAEmbedding):
        return {f"{KEY_PREFIX}{name}.lora_embedding_A": layer.lora_embedding_A,
                f"{KEY_PREFIX}{name}.lora_embedding_B": layer.lora_embedding_B}
    tensors = {adapter_key(name, "lora_A"): layer.lora_A.weight, adapter_key(name, "lora_B"): layer.lora_B.weight}
    if isinstance(layer, DoRALinear):
        tensors[KEY_PREFIX + magnitude_key(name)] = layer.lora_magnitude_vector
    return tensors


def layer_shapes(name: str, module: nn.Module, r: int, use_dora: bool) -> dict[str, tuple[int, ...]]:
    """The shapes ``layer_tensors`` will have once the target ``module`` at ``name`` is adapted with rank ``r``."""
    if isinstance(module, nn.Embedding):
        return {f"{KEY_PREFIX}{name}.lora_embedding_A": (r, module.num_embeddings),
                f"{KEY_PREFIX}{name}.lora_embedding_B": (module.embedding_dim, r)}
    shapes = {adapter_key(name, "lora_A"): (r, module.in_features),
              adapter_key(name, "lora_B"): (module.out_features, r)}
    if use_dora:
        shapes[KEY_PREFIX + magnitude_key(name)] = (module.out_features,)
    return shapes


def lora_modules(model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Module]:
    """``{module path: LoRA module}`` of the adapter ``adapter_name`` of ``model``; None: the active one."""
    return dict(adapted_modules(model)) if adapter_name is None else adapter_layers(model, adapter_name)


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Every LoRA A and B (and DoRA magnitude, embedding adapter) of ``model`` under peft's keys (detached).

    ``adapter_name``: that named adapter's (``lora/named.py``), active or not; None: the active one's.
    """
    return {key: tensor.detach() for name, layer in lora_modules(model, adapter_name).items()
            for key, tensor in layer_tensors(name, layer).items()}


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None,
                   adapter_name: str | None = None) -> dict:
    """The ``adapter_config.json`` contents for the LoRA layers of ``model`` (of its adapter ``adapter_name``).

    ``target_modules`` is written as the short names (``["q_proj", "v_proj"]``) when those
    select exactly the adapted layers, else as the full module names.

    Raises:
        ValueError: ``model`` has no LoRA layers, or its layers disagree on r, alpha, dropout or
            use_rslora (peft's config holds one value of each).
    """
    layers = lora_modules(model, adapter_name)
    if not layers:
        raise ValueError("the model has no LoRA layers to save; call inject_lora(model) first")
    # An embedding adapter has r and alpha only: no dropout, plain scaling and start (lora/embedding.py).
    plain = {"dropout": 0.0, "use_rslora": False, "init_lora_weights": True}
    settings = {}
    for field, attribute in (("r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"),
                             ("use_rslora", "use_rslora"), ("init_lora_weights", "init_lora_weights")):
        values = sorted({getattr(layer, attribute, plain.get(attribute)) for layer in layers.values()}, key=str)
        if len(values) > 1:
            raise ValueError(f"LoRA layers have different {field} values {values}; one adapter file holds one")
        settings[field] = values[0]
    kinds = {isinstance(layer, DoRALinear) for layer in layers.values() if not isinstance(layer, LoRAEmbedding)}
    if len(kinds) > 1:
        raise ValueError("some LoRA layers are DoRA and some are not; one adapter file holds one kind")
    settings["use_dora"] = kinds.pop() if kinds else False

    names = list(layers)
    short = short_names(names)
    selected = [name for name, _ in candidate_modules(model) if matches_target(name, short)]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        **settings,
        "target_modules": short if selected == names else names,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None,
                 initial: dict[str, torch.Tensor] | None = None, adapter_name: str | None = None) -> Path:
    """Write the LoRA weights and config of ``model`` to ``folder`` (created if needed); return the folder.

    The folder loads with ``load_adapter`` and with ``peft.PeftModel.from_pretrained``. The two
    files are written into a new folder beside ``folder``, which is then swapped in whole
    (``replace_folder_atomically``): a reader, or a crash, finds the old pair or the new pair,
    never new weights beside an old config.

    Args:
        tensors: the weights to write, under peft's keys, when ``model`` does not hold them
            whole (FSDP2 shards each A and B over the processes; ``training/distributed.py``
            gathers them); default ``adapter_state_dict(model)``.
        initial: for a PiSSA model, its A and B as ``inject_lora(init="pissa")`` set them (peft's
            keys). The adapter is then written for the ORIGINAL base, as a plain rank-2r LoRA
            adapter (``lora/pissa.py``: ``pissa_to_lora``), which loads anywhere LoRA does.
            Without it a PiSSA adapter is written as it is, ``init_lora_weights: "pissa"``, and
            loading redoes the SVD on the original base.
        adapter_name: which named adapter to write (``lora/named.py``), active or not; None: the active one.

    Raises:
        ValueError: ``model`` has no LoRA layers (see ``adapter_config``), or ``folder`` holds
            files other than an adapter's, which replacing the folder would delete.
        NotADirectoryError: ``folder`` is a file.
    """
    folder = Path(folder)
    config = adapter_config(model, base_model_name_or_path, adapter_name)
    tensors = adapter_state_dict(model, adapter_name) if tensors is None else tensors
    if initial is not None:
        if config["init_lora_weights"] != "pissa":
            raise ValueError("initial is for converting a PiSSA adapter; this model's LoRA started as plain LoRA")
        tensors, config = pissa_to_lora(initial, tensors), pissa_to_lora_config(config)
    check_replaceable(folder, subfolders=False)
    replace_folder_atomically(folder, lambda temporary: write_adapter_files(temporary, tensors, config))
    return folder


def write_adapter_files(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write ``tensors`` and ``config`` into ``folder`` (which exists) as an adapter's two files."""
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, folder / WEIGHTS_NAME,
              metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def check_replaceable(folder: Path, subfolders: bool) -> None:
    """Raise unless ``folder`` is missing or holds only an adapter's files (and, with ``subfolders``, folders of
    adapter files, as ``save_adapters`` writes): saving replaces the whole folder, and must delete nothing else."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        inside = sorted(path.iterdir()) if subfolders and path.is_dir() else [path]
        for other in inside:
            if other.name not in (WEIGHTS_NAME, CONFIG_NAME) or not other.is_file():
                raise ValueError(f"{folder} holds {other.relative_to(folder)}, not only an adapter; saving replaces "
                                 "the whole folder, so choose a new or empty one")


def save_adapters(model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write every named adapter of ``model`` (``lora/named.py``) into ``folder``, in peft's layout; return the folder.

    The adapter ``"default"`` goes into ``folder`` itself, each other one into ``folder/<name>``,
    as peft's ``save_pretrained`` writes a model with several adapters. Each is an adapter folder
    as ``save_adapter`` writes one, so ``load_adapter(model, folder / name, adapter_name=name)``
    and peft's ``load_adapter(folder / name, adapter_name=name)`` read it; ``load_adapters`` reads
    them all. The whole tree is written beside ``folder`` and swapped in at once.

    Raises:
        ValueError: ``model`` has no LoRA layers, or ``folder`` holds anything but adapters.
        NotADirectoryError: ``folder`` is a file.
    """
    folder = Path(folder)
    names = adapter_names(model)
    if not names:
        raise ValueError("the model has no LoRA layers to save; call inject_lora(model) or add_adapter first")
    adapters = {name: (adapter_state_dict(model, name), adapter_config(model, base_model_name_or_path, name))
                for name in names}
    check_replaceable(folder, subfolders=True)

    def write(temporary: Path) -> None:
        for name, (tensors, config) in adapters.items():
            where = temporary if name == DEFAULT else temporary / name
            where.mkdir(exist_ok=True)
            write_adapter_files(where, tensors, config)

    replace_folder_atomically(folder, write)
    return folder


def load_adapters(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Load every adapter of a folder ``save_adapters`` (or peft's ``save_pretrained``) wrote; return their names.

    The folder's own adapter, if it has one, is ``"default"``; each subfolder holding an adapter
    is loaded under the subfolder's name (``load_adapter(..., adapter_name=...)``).

    Raises:
        FileNotFoundError: ``folder`` holds no adapter at all.
        ValueError: as ``load_adapter`` raises.
    """
    folder = Path(folder)
    found = [(DEFAULT, folder)] if (folder / CONFIG_NAME).is_file() else []
    found += [(path.name, path) for path in sorted(folder.iterdir()) if (path / CONFIG_NAME).is_file()] \
        if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} in it or in its subfolders; save_adapters or peft's "
                                "save_pretrained writes one per adapter")
    for name, where in found:
        load_adapter(model, where, adapter_name=name)
    return [name for name, _ in found]


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Read and check an ``adapter_config.json``; errors name the file and the field.

    Raises:
        ValueError: not UTF-8 JSON, not an object, or a field that is missing, of the wrong type
            or asks for something other than LoRA as this library loads it; one line naming the file.
    """
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; an adapter config is JSON (written by save_adapter or peft)") \
            from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:  # an integer of over 4300 digits; nesting deeper than the stack
        raise ValueError(f"{path}: JSON that Python cannot read ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters load here")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise ValueError(f"{path}: field {field!r} is missing")
    try:
        check_hyperparameters(config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    targets = config["target_modules"]
    if not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{path}: target_modules must be a list of names or a regular expression string")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            raise ValueError(f"{path}: target_modules {targets!r} is not a regular expression ({error})") from None
    for field in ("use_rslora", "use_dora"):
        if not isinstance(config.get(field), (bool, type(None))):  # not `in (True, False)`: 1 == True there
            raise ValueError(f"{path}: {field} is {config[field]!r}; it must be true or false")
    if config.get("init_lora_weights") not in LOADABLE_INITS:
        raise ValueError(f"{path}: init_lora_weights is {config['init_lora_weights']!r}, which changed the base "
                         f"weights in a way this library does not redo; it loads {LOADABLE_INITS}")
    for field, plain in PLAIN_LORA.items():
        if config.get(field) not in plain:
            raise ValueError(
                f"{path}: {field} is {config[field]!r}; this library does not load that option "
                f"(it needs {field}: {plain[0]!r})"
            )
    return config


def load_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str | None = None) -> list[str]:
    """Load an adapter folder (saved here or by peft) into ``model``; return the adapted module names.

    A model without LoRA gets it injected first, with r, alpha, dropout and target
    modules read from the config. A model that already has LoRA must have it on exactly
    the adapter's modules, with the adapter's r and alpha. Everything is checked before
    anything in ``model`` changes.

    ``adapter_name`` (``lora/named.py``): a new name adds the folder as a new adapter beside the
    others, as peft's ``load_adapter(folder, adapter_name)`` does (active only if it is the
    model's first); the name of an adapter the model holds loads into that one. None loads into
    the active adapter, or injects LoRA into a model without it.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        ValueError: a tensor is missing, unexpected or of the wrong shape; the config is
            malformed or asks for something other than plain LoRA.
    """
    if adapter_name is None:
        return load_into_model(model, Path(folder))
    if adapter_name in adapter_names(model):
        with adapter_active(model, adapter_name):
            return load_into_model(model, Path(folder))
    config = Path(folder) / CONFIG_NAME
    if config.is_file() and adapter_names(model) and read_adapter_config(config).get("init_lora_weights") == "pissa":
        raise ValueError(f"{config}: a PiSSA adapter needs the original base, whose SVD loading takes again, and "
                         "changes it; load it into a model without adapters")
    with new_adapter(model, adapter_name):
        return load_into_model(model, Path(folder))


def load_into_model(model: nn.Module, folder: Path) -> list[str]:
    """``load_adapter`` into the LoRA layers in ``model``'s tree, or into a model without LoRA (injected)."""
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such file; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(written by save_adapter or peft's save_pretrained)"
            )
    config = read_adapter_config(config_path)
    try:
        tensors = load_file(weights_path)
    except SafetensorError as error:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from None

    r, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0)
    use_rslora, use_dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
    init = "pissa" if config.get("init_lora_weights") == "pissa" else "lora"
    existing = dict(adapted_modules(model))
    if existing and init == "pissa":
        raise ValueError(f"{config_path}: a PiSSA adapter (init_lora_weights: pissa) needs the original base, whose "
                         "SVD loading takes again; load it into a model without LoRA")
    if existing:
        for name, layer in existing.items():
            for field, attribute, wanted in (("lora_alpha", "alpha", alpha), ("use_rslora", "use_rslora", use_rslora)):
                if getattr(layer, attribute, False) != wanted:
                    raise ValueError(
                        f"{config_path}: {field} is {wanted} but {name} has {attribute} {getattr(layer, attribute)}; "
                        "load into a model without LoRA to take the adapter's settings"
                    )
            if isinstance(layer, LoRALinear) and isinstance(layer, DoRALinear) != use_dora:
                raise ValueError(f"{config_path}: use_dora is {use_dora} but {name} is "
                                 f"{'' if isinstance(layer, DoRALinear) else 'not '}a DoRA layer; "
                                 "load into a model without LoRA to take the adapter's settings")
        expected = adapter_state_dict(model)
        shapes = {key: tuple(tensor.shape) for key, tensor in expected.items()}
    else:
        shapes = {}
        for name in find_targets(model, config["target_modules"]):
            shapes.update(layer_shapes(name, model.get_submodule(name), r, use_dora))

    for key in list(tensors):
        name = key[len(KEY_PREFIX):].removesuffix(".base_layer.weight")
        if key.endswith(".base_layer.weight") and f"{KEY_PREFIX}{name}.lora_embedding_A" in shapes:
            # peft's save_pretrained also writes the whole table of an adapted embedding. Loading it would put
            # that table in place of the model's; it is only safe when it is the model's table already.
            embedding = model.get_submodule(name)
            table = (embedding.base_layer if isinstance(embedding, LoRAEmbedding) else embedding).weight
            if not torch.equal(tensors.pop(key).to(table.dtype), table.detach()):
                raise ValueError(f"{weights_path}: {key} is a copy of the embedding table that differs from this "
                                 "model's; load the adapter on the base model it was saved from")
    for key in tensors:
        if key not in shapes:
            raise ValueError(f"{weights_path}: unexpected tensor {key}; the model has no LoRA layer of that name")
    for key, shape in shapes.items():
        if key not in tensors:
            raise ValueError(f"{weights_path}: missing tensor {key}; the adapter was saved for other modules")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{weights_path}: tensor {key} has shape {tuple(tensors[key].shape)} but the model needs {shape}; "
                "the adapter was saved for another base model or another r"
            )

    if not existing:
        inject_lora(model, config["target_modules"], r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                    init=init, use_dora=use_dora)
    layers = dict(adapted_modules(model))
    with torch.no_grad():
        for name, layer in layers.items():
            was_merged = layer.merged
            layer.unmerge()  # a merged W holds the old ΔW: take it out before A and B change
            for key, parameter in layer_tensors(name, layer).items():
                parameter.copy_(tensors[key])
            if was_merged:
                layer.merge()
    return list(layers)
