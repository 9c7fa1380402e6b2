"""The Hugging Face side: transformers' own modules of the architecture, run one decoder layer at a time.

The model is built without weights (parameters on the meta device; buffers such as rotary frequencies real, as
transformers computes them). A stage's weights are loaded into its modules right before it runs and released
after, through transformers' own loading code (`convert_and_load_state_dict_in_model` with the model's weight
conversion mapping: fused experts, renamed checkpoints), so a module holds exactly what `from_pretrained` would
put there. Routed experts are never loaded as a whole: the experts module indexes `gate_up_proj[e]` /
`down_proj[e]` one expert at a time, and those are fetched on demand (`install_experts`).

How a prompt goes through: `record` runs the model's own forward once per prompt with the embedding looking up
only the prompt's rows and every decoder layer replaced by a recorder, which keeps the layer's inputs (hidden
states, attention masks, position embeddings: whatever that architecture's forward passes) and stops the forward
after the last layer; `layer` then runs the real layer on them, `final` the model's final norm, `logits` its
output projection on one vocabulary block (plus Gemma2's final soft-cap, the one step of the causal-LM head that
is not a module). Same modules, same inputs, same order: the logits equal a whole-model forward bit for bit.

Never `trust_remote_code`: only architectures that ship with transformers load. Eager attention (softmax in
float32) and the eager experts loop (the reference implementation; `grouped_mm` differs by float rounding).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from converters.core.transforms import Fusion
from converters.errors import CkptflowError

log = logging.getLogger("ckptflow.verify")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict:
    p = Path(folder) / name
    if not p.is_file():
        raise CkptflowError(f"{folder}: no {name} (not a Hugging Face model folder)")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise CkptflowError(f"{p}: not valid JSON ({e})") from None


def has_tokenizer(folder: str | os.PathLike | None) -> bool:
    return folder is not None and any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(*folders: str | os.PathLike | None):
    """The first tokenizer that loads from `folders` (None when there is none).

    A folder that has tokenizer files but fails to load is reported and skipped.
    """
    for folder in folders:
        if not has_tokenizer(folder):
            continue
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            log.info("tokenizer: %s (%s)", folder, type(tok).__name__)
            return tok
        except Exception as e:  # tokenizers raise many kinds; fall back to seeded ids
            log.warning(
                "could not load the tokenizer in %s (%s); trying the next source", folder, str(e).splitlines()[0][:200]
            )
    return None


def torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise CkptflowError(f"unknown dtype {name!r} (choose float32 or bfloat16)") from None


def to_torch(a: np.ndarray, dtype=None):
    """A numpy array (bfloat16 included) as a torch tensor sharing its memory, cast to `dtype` when given."""
    import torch

    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


@contextlib.contextmanager
def _parameters_on_meta():
    """Build a model with every parameter on the meta device (no memory) and its buffers real."""
    import torch
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = register


class _Stop(Exception):
    """Raised by the last layer's recorder: the rest of the forward is the streamed stages' job."""


@dataclass
class HFPrompt:
    """One prompt on the HF side: its hidden states and each decoder layer's other inputs."""

    x: object  # torch [1, T, E]
    layer_kwargs: list = field(default_factory=list)  # per layer: (extra positional args, keyword args)
    # Qwen3-VL's deepstack: (visual position mask, features), feature k added after layer k (the text model's loop)
    deepstack: tuple | None = None

    def follow(self, other: "HFPrompt") -> None:
        """Take `other`'s hidden states after a layer both computed identically, with the state its layers hand on
        (Gemma 4's `shared_kv_states`, one object in every layer's keyword arguments), as if this one had run it."""
        self.x = other.x
        mine = self.layer_kwargs[0][1].get("shared_kv_states") if self.layer_kwargs else None
        if mine is not None:
            mine.update(other.layer_kwargs[0][1]["shared_kv_states"])


class HFModel:
    """transformers' model of `config` (a config.json dict) in `dtype`, weights loaded stage by stage."""

    def __init__(self, config: dict, dtype: str = "float32", unconverted: tuple[str, ...] = (), fusions: tuple = ()):
        import torch
        from transformers import CONFIG_MAPPING, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
        from transformers.utils import logging as hf_logging

        torch.set_grad_enabled(False)
        hf_logging.disable_progress_bar()  # transformers' per-call "Loading weights" bar
        os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")  # the tensors are in memory already: no loader threads
        # oneDNN (bf16 matmuls) caches up to 1024 primitives with their buffers; every expert sees another token count,
        # so a MoE layer fills it and memory grows layer by layer. 16 is as fast and stays flat (docs/performance.md,
        # "Verify").
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
        model_type = config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise CkptflowError(
                f"transformers {__import__('transformers').__version__} has no model_type {model_type!r}"
            )
        self.dtype = torch_dtype(dtype)
        try:
            cfg = CONFIG_MAPPING[model_type].from_dict(copy.deepcopy(config))
            with _parameters_on_meta():
                kwargs = {"experts_implementation": "eager"} if _has_experts(cfg) else {}
                # a multimodal Llama 4 config (`llama4`): AutoModelForCausalLM would build its language model alone;
                # the conversion holds the vision tower too, which only Llama4ForConditionalGeneration loads
                auto = AutoModelForCausalLM
                # (and Qwen3.5: its AutoModelForCausalLM is the language model alone, without the tower)
                if type(cfg) not in auto._model_mapping or model_type in ("llama4", "qwen3_5_moe"):
                    from transformers import AutoModelForImageTextToText as auto
                self.model = auto.from_config(cfg, dtype=self.dtype, attn_implementation="eager", **kwargs).eval()
        except CkptflowError:
            raise
        except Exception as e:  # an architecture transformers cannot build from this config
            raise CkptflowError(
                f"transformers cannot build a {model_type} model from this config.json: {str(e).splitlines()[0][:300]}"
            ) from None
        m = self.model
        self.text_config = m.config.get_text_config()
        self.decoder = m.get_decoder()
        if not hasattr(self.decoder, "layers"):  # Llama4ForCausalLM: base_model_prefix names no attribute of it
            # (Llama4ForConditionalGeneration's get_decoder is that Llama4ForCausalLM)
            self.decoder = getattr(self.decoder, "model", None) or m.model
        self.layers = self.decoder.layers
        self.embed = m.get_input_embeddings()
        self.head = m.get_output_embeddings()
        self.softcap = getattr(self.text_config, "final_logit_softcapping", None)
        names = {id(mod): name for name, mod in m.named_modules()}
        self.layer_names = [names[id(layer)] for layer in self.layers]
        self._streamed = (*self.layer_names, names[id(self.embed)], names[id(self.head)])  # loaded piece by piece
        # what runs after the last layer, in order, with weights of its own: DeepSeek-V4 first collapses its
        # hyper-connection streams (`hc_head`), every model then applies its final norm
        self.final_modules = [m for m in (getattr(self.decoder, "hc_head", None), self.decoder.norm) if m is not None]
        self.final_names = [names[id(m)] for m in self.final_modules]
        mapping = get_model_conversion_mapping(m)
        self._renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        self._converters = [t for t in mapping if isinstance(t, WeightConverter)]
        self._mapping = mapping
        self._dtype_plan = m._get_dtype_plan(self.dtype)
        self._meta_state = m.state_dict()  # names and shapes only (meta)
        self._lazy: dict = {}  # (module, param name) -> the meta Parameter an expert fetcher replaced
        self._row_tables: dict[str, object] = {}  # checkpoint name -> embedding module looked up by id (`by_rows`)
        # regexes of tensors the conversion leaves out (an unconverted vision tower): never loaded, never run on text
        self._unconverted = tuple(re.compile(p) for p in unconverted)
        self._fusions = {f.name: f for f in fusions if isinstance(f, Fusion)}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def by_rows(self, names: list[str]) -> None:
        """Tables besides the input embedding that the forward looks up by token id (Gemma 4's per-layer embedding):
        read like the embedding, only the rows a prompt uses (`record`'s `table_rows`), never loaded whole."""
        for name in names:
            module_name = self.param_name(name)[0].rpartition(".")[0]
            self._row_tables[name] = self.model.get_submodule(module_name)
            self._streamed = (*self._streamed, module_name)

    # ---- weights --------------------------------------------------------------------------------------------
    def param_name(self, checkpoint_name: str) -> tuple[str, str | None]:
        """(module parameter, converter source pattern or None) a checkpoint tensor becomes (transformers' renaming)."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(
            checkpoint_name, self._renamings, self._converters, self.model.base_model_prefix, self._meta_state
        )

    def load(self, tensors: dict, scope: str | None = None) -> None:
        """Load checkpoint-named tensors (numpy or torch) into the model as `from_pretrained` would, then check that
        every parameter and persistent buffer under module `scope` (None: every module but the decoder layers, the
        embedding and the output projection) now holds real data."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        tensors = self._unfused(tensors)
        state = {name: to_torch(a) if isinstance(a, np.ndarray) else a for name, a in tensors.items()}
        info, _ = convert_and_load_state_dict_in_model(
            self.model,
            state,
            LoadStateDictConfig(dtype=self.dtype, dtype_plan=self._dtype_plan, weight_mapping=self._mapping),
        )
        bad = sorted(info.unexpected_keys) + [
            f"{k} {list(got)} (model: {list(want)})" for k, got, want in info.mismatched_keys
        ]
        bad += [f"{k}: {v}" for k, v in (info.conversion_errors or {}).items()]
        if bad:
            raise CkptflowError(f"transformers refused tensors: {', '.join(map(str, bad[:5]))}")

        def within(n: str) -> bool:
            return (
                n.startswith(scope + ".")
                if scope is not None
                else not any(n == s or n.startswith(s + ".") for s in self._streamed)
            )

        empty = [
            n
            for n, t in self.model.state_dict().items()
            if t.is_meta and within(n) and not any(p.fullmatch(n) for p in self._unconverted)
        ]
        if empty:
            raise CkptflowError(
                f"no tensor for {', '.join(empty[:5])} (transformers' {type(self.model).__name__} expects them)"
            )

    def _unfused(self, tensors: dict) -> dict:
        """Fused tensors the rules name (`Family.hf_fusions`) as the parts transformers expects."""
        if not any(n in self._fusions for n in tensors):
            return tensors
        out = {}
        for name, a in tensors.items():
            f = self._fusions.get(name)
            if f is None:
                out[name] = a
                continue
            x = a if isinstance(a, np.ndarray) else a.float().numpy()
            out.update((part, f.take(x, k)) for k, (part, _) in enumerate(f.parts))
        return out

    def release(self, module) -> None:
        """Put a module's parameters and checkpoint buffers back on the meta device: the memory goes with the last
        reference."""
        from torch import nn

        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and not p.is_meta:
                    sub._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)
            for name, b in list(sub._buffers.items()):  # loaded ones (DeepSeek's routing bias); computed ones stay
                if b is not None and not b.is_meta and name not in sub._non_persistent_buffers_set:
                    sub._buffers[name] = b.to("meta")

    def expert_params(self, tensors: dict) -> dict:
        """One expert's checkpoint tensors (per-expert names, or one row of a fused tensor under its own name) as
        that expert's slice of each fused module parameter, through transformers' own converters."""
        from transformers.core_model_loading import Transpose

        groups: dict = {}
        out = {}
        for name, a in tensors.items():
            target, pattern = self.param_name(name)
            t = to_torch(a, self.dtype) if isinstance(a, np.ndarray) else a.to(self.dtype)
            if pattern is None:  # stored fused (GPT-OSS): the row is the slice
                out[target] = t
                continue
            ops = next(c for c in self._converters if pattern in c.source_patterns).operations
            if all(isinstance(op, Transpose) for op in ops):  # fused, stored transposed (Qwen3-VL-MoE)
                out[target] = _transpose_row(t, ops, tuple(self._meta_state[target].shape[1:]))
                continue
            conv = groups.get(target)
            if conv is None:
                conv = groups[target] = copy.deepcopy(next(c for c in self._converters if pattern in c.source_patterns))
            conv.add_tensor(target, name, pattern, t)
        for target, conv in groups.items():
            for param, value in conv.convert(target, model=self.model, config=self.model.config).items():
                value = value[0] if isinstance(value, list) else value
                out[param] = value[0]  # the converter stacked one expert
        return out

    def install_experts(self, params: list[str], fetch: Callable[[int], dict]) -> None:
        """Replace fused expert parameters (full names) by objects whose `[e]` is `fetch(e)[name]`."""
        for full in params:
            path, _, name = full.rpartition(".")
            module = self.model.get_submodule(path)
            self._lazy[(module, name)] = module._parameters.pop(name)
            setattr(module, name, _ExpertSlices(fetch, full))
            if type(module).__name__ == "Llama4TextExperts" and "forward" not in vars(module):
                module.forward = functools.partial(_llama4_experts, module)

    def remove_experts(self) -> None:
        for (module, name), meta in self._lazy.items():
            delattr(module, name)
            module._parameters[name] = meta
            vars(module).pop("forward", None)
        self._lazy.clear()

    # ---- stages ---------------------------------------------------------------------------------------------
    def record(
        self,
        token_ids,
        embedding_rows: Callable[[np.ndarray], np.ndarray],
        inputs: dict | None = None,
        table_rows: Callable[[str, np.ndarray], np.ndarray] | None = None,
    ) -> HFPrompt:
        """Run the model's forward up to the first decoder layer's input and record every layer's other inputs.

        embedding_rows(ids) -> the embedding's rows for those ids (sorted, unique); `inputs`: extra model inputs
        of a multimodal prompt (numpy), whose encoders must be loaded; table_rows(name, ids): the rows of the other
        tables read by rows (`by_rows`)."""
        import torch
        from torch import nn

        def looked_up(emb, rows_of):
            forward = type(emb).forward
            weight = emb._parameters["weight"]

            def lookup(ids):  # the module's own forward on the rows the prompt uses
                uniq, inverse = torch.unique(ids, return_inverse=True)
                emb._parameters["weight"] = nn.Parameter(
                    to_torch(rows_of(uniq.numpy()), self.dtype), requires_grad=False
                )
                try:
                    return forward(emb, inverse)
                finally:
                    emb._parameters["weight"] = weight

            return lookup

        emb = self.embed
        tables = [(m, functools.partial(table_rows, n)) for n, m in self._row_tables.items()]

        prompt = HFPrompt(None, [None] * self.num_layers)

        def recorder(i: int):
            def run(hidden, *args, **kwargs):
                if i == 0:
                    prompt.x = hidden
                prompt.layer_kwargs[i] = (args, kwargs)
                if i == self.num_layers - 1:
                    raise _Stop
                return hidden

            return run

        decoder_forward = self.decoder.forward

        def decoder(*args, **kwargs):  # the text model's own inputs that its layer loop uses between layers
            if kwargs.get("deepstack_visual_embeds") is not None:
                prompt.deepstack = (kwargs["visual_pos_masks"], list(kwargs["deepstack_visual_embeds"]))
            return decoder_forward(*args, **kwargs)

        for m, rows_of in [(emb, embedding_rows), *tables]:
            m.forward = looked_up(m, rows_of)
        self.decoder.forward = decoder
        for i, layer in enumerate(self.layers):
            layer.forward = recorder(i)
        extra = {k: torch.from_numpy(np.asarray(v)) for k, v in (inputs or {}).items()}
        # Llama 4 moves the ids to `embed_tokens.weight.device` before the lookup: a CPU placeholder, not meta
        meta_weight = emb._parameters["weight"]
        emb._parameters["weight"] = nn.Parameter(
            torch.empty((0, meta_weight.shape[-1]), dtype=meta_weight.dtype), False
        )
        if "pixel_values" in extra:
            extra["pixel_values"] = extra["pixel_values"].to(self.dtype)
        try:
            self.model(input_ids=torch.tensor([list(token_ids)], dtype=torch.long), use_cache=False, **extra)
        except _Stop:
            pass
        finally:
            emb._parameters["weight"] = meta_weight
            del emb.forward
            for m, _ in tables:
                del m.forward
            del self.decoder.forward
            for layer in self.layers:
                del layer.forward
        if any(k is None for k in prompt.layer_kwargs):
            raise CkptflowError(
                f"{type(self.model).__name__}'s forward did not call all {self.num_layers} decoder layers"
            )
        return prompt

    def layer(self, i: int, prompt: HFPrompt) -> None:
        import torch

        args, kwargs = prompt.layer_kwargs[i]
        with torch.no_grad():  # per thread: MoE layers run each prompt in a thread of its own
            prompt.x = self.layers[i](prompt.x, *args, **kwargs)
            if prompt.deepstack is not None and i < len(prompt.deepstack[1]):
                mask, features = prompt.deepstack
                prompt.x = self.decoder._deepstack_process(prompt.x, mask, features[i])

    def final(self, prompt: HFPrompt) -> None:
        import torch

        with torch.no_grad():
            for module in self.final_modules:
                prompt.x = module(prompt.x)

    def logits(self, prompt: HFPrompt, rows) -> np.ndarray:
        """float32 logits `[T, Vb]` of one vocabulary block: `rows` are the output projection's rows (torch)."""
        import torch
        from torch import nn

        weight = self.head._parameters["weight"]
        self.head._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
        try:
            logits = self.head(prompt.x)[0]
        finally:
            self.head._parameters["weight"] = weight
        if self.softcap is not None:  # the causal-LM head's final soft-cap (Gemma2), as its forward writes it
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits.float().numpy()


def _transpose_row(row, ops, want: tuple):
    """One expert's row of a fused tensor through transformers' Transpose ops on the stacked tensor (axes counted with
    the expert axis; `check_dims`: only when the shape is not the model's already)."""
    import torch

    x = row[None]
    for op in ops:
        if not (op.check_dims and tuple(x.shape[1:]) == want):
            x = torch.transpose(x, op.dim0, op.dim1)
    return x[0].contiguous()


class _ExpertSlices:
    """Stands in for a fused expert parameter: `[e]` fetches expert e's slice when the experts loop asks for it."""

    def __init__(self, fetch: Callable[[int], dict], name: str):
        self.fetch, self.name = fetch, name

    def __getitem__(self, e):
        return self.fetch(int(e))[self.name]


def _llama4_experts(module, hidden_states):
    """transformers' Llama4TextExperts.forward (one bmm over all experts of the whole fused tensors) one expert at a
    time. Its input is every token once per expert, scaled by that expert's router score: 0 for the experts a
    token does not use, whose output rows are then exactly 0 (silu(0) * 0), so an expert no token uses is skipped."""
    import torch

    h = hidden_states.view(module.num_experts, -1, module.hidden_size)
    out = torch.zeros_like(h)
    for e in range(module.num_experts):
        if bool(h[e].any()):
            gate, up = torch.matmul(h[e], module.gate_up_proj[e]).chunk(2, dim=-1)
            out[e] = torch.matmul(up * module.act_fn(gate), module.down_proj[e])
    return out.view(-1, module.hidden_size)


def _has_experts(cfg) -> bool:
    """Models whose experts module takes `experts_implementation` (setting it on others is refused)."""
    text = cfg.get_text_config()
    return any(getattr(text, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
