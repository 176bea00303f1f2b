"""Lean encoder layers: a layer's whole forward as one function of its submodules' parameters
(``F.linear(x, dense.weight, dense.bias)``, not ``dense(x)``), where nothing could tell it from
transformers' module calls.

A module call costs host time (``nn.Module.__call__``, its hook checks, transformers' wrappers)
that a small layer on a GPU waits for. Calling the modules' functions instead is exact only while
nobody observes those modules: no torch hook on them or global, no transformers output capturing
hook that collects in this forward, no TorchScript trace, and every module exactly of its class
(a subclass, e.g. PEFT's LoRA linear, may compute something else). :class:`LeanModules` finds a
layer's submodules once and checks all of that on each call.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.nn.modules import module as torch_module
from transformers.utils import output_capturing

from d2v_kernels import ops
from d2v_kernels.models._common import gelu_approximation, qkv_projection
from d2v_kernels.models.hf_attention import IMPLEMENTATION_NAME, mask_arguments

# Keyword arguments the fused layers' attention (d2v_kernels_attention_forward) reads or ignores
# alike; any other sends a layer down transformers' forward.
LEAN_KWARGS = frozenset({"position_ids", "output_attentions", "output_hidden_states", "return_dict", "use_cache"})

# torch's hooks on every module: any of them makes every module call observable.
_GLOBAL_HOOKS = (
    torch_module._global_forward_hooks,
    torch_module._global_forward_pre_hooks,
    torch_module._global_backward_hooks,
    torch_module._global_backward_pre_hooks,
)


def _capture_key(hook) -> str | None:
    """The output key (``"attentions"``, ...) of one of transformers' output-capturing hooks
    (``transformers.utils.output_capturing``), None for any other hook."""
    code = getattr(hook, "__code__", None)
    if code is None or code.co_name != "output_capturing_hook" or code.co_filename != output_capturing.__file__:
        return None
    return hook.__closure__[code.co_freevars.index("key")].cell_contents


def _observed(module: nn.Module) -> bool:
    return bool(
        module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or (module._forward_hooks and _forward_hooks_observe(module._forward_hooks))
    )


def _forward_hooks_observe(hooks) -> bool:
    # transformers installs its capturing hooks once, for good: one whose output this forward does
    # not collect returns at once, so not calling it changes nothing.
    for hook in hooks.values():
        key = _capture_key(hook)
        if key is None:
            return True
        collecting = output_capturing._active_collector.get()
        if collecting is not None and key in collecting:
            return True
    return False


class LeanModules:
    """A layer's submodules at ``paths``, pairs (dotted path, e.g. ``"attention.output.dense"``,
    class or tuple of classes it must be exactly, or None for any object: an activation function).

    ``modules``: them, in the order of ``paths``, when each is exactly of its class, else None.
    ``current()``: each is still its parent's child (a replaced one makes a new ``LeanModules``).
    ``unobserved()``: nothing observes a call of any of them (see the module docstring)."""

    def __init__(self, layer: nn.Module, paths: tuple):
        links, found, exact = [], [], True
        for path, classes in paths:
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            holder = parent._modules if name in parent._modules else parent.__dict__
            child = holder.get(name)
            links.append((holder, name, child))
            found.append(child)
            if classes is not None and type(child) is not classes:
                exact = exact and type(classes) is tuple and type(child) in classes
        self.links = tuple(links)
        self.modules = tuple(found) if exact else None
        self.observable = tuple(m for m in found if isinstance(m, nn.Module))

    def current(self) -> bool:
        for holder, name, child in self.links:
            if holder.get(name) is not child:
                return False
        return True

    def unobserved(self) -> bool:
        if any(_GLOBAL_HOOKS) or torch._C._get_tracing_state() is not None:
            return False
        for module in self.observable:  # _observed, inlined: a call a module is most of its cost
            if module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
                return False
            if module._forward_hooks and _forward_hooks_observe(module._forward_hooks):
                return False
        return True


def lean_modules(layer: nn.Module, paths: tuple) -> tuple | None:
    """``layer``'s submodules at ``paths`` (cached on it) when its lean forward is exact, else None."""
    found = layer.__dict__.get("_d2v_lean")
    if found is None or not found.current():
        found = layer.__dict__["_d2v_lean"] = LeanModules(layer, paths)
    if found.modules is None or not found.unobserved():
        return None
    return found.modules


def registry_lean_modules(layer: nn.Module, paths: tuple, attention: int, kwargs: dict) -> tuple | None:
    """``lean_modules`` for a layer whose attention (``paths[attention]``) runs through
    transformers' registry: also None unless the call's keyword arguments are all in
    ``LEAN_KWARGS`` and the registry's implementation is ``d2v_kernels`` with no attentions asked
    for (in the call or the config)."""
    if not LEAN_KWARGS.issuperset(kwargs) or kwargs.get("output_attentions"):
        return None
    modules = lean_modules(layer, paths)
    if modules is None:
        return None
    implementation, output_attentions = _attention_settings(modules[attention].config)
    if implementation != IMPLEMENTATION_NAME or output_attentions:
        return None
    return modules


# transformers' own properties for the two settings read on every layer call, and the instance
# attributes they return (a config's ``__getattribute__`` chain costs microseconds a read).
_SETTING_PROPERTIES = (
    ("_attn_implementation", "_attn_implementation_internal"),
    ("output_attentions", "_output_attentions"),
)
_DIRECT_CLASSES: dict[type, bool] = {}


def _reads_directly(cls: type) -> bool:
    """Whether ``cls``'s two settings are transformers' properties returning those attributes."""
    direct = _DIRECT_CLASSES.get(cls)
    if direct is None:
        base = transformers.PretrainedConfig
        direct = _DIRECT_CLASSES[cls] = all(
            isinstance(getattr(base, name, None), property)
            and getattr(cls, name, None) is getattr(base, name)
            and f"return self.{attribute}\n" in _property_source(getattr(base, name))
            for name, attribute in _SETTING_PROPERTIES
        )
    return direct


def _property_source(prop: property) -> str:
    try:
        return inspect.getsource(prop.fget)
    except (OSError, TypeError):
        return ""


def _attention_settings(config) -> tuple:
    """(``config._attn_implementation``, ``config.output_attentions``): from the instance's dict
    where its class reads them there (two lookups), else (and when traced: dynamo does not follow
    ``object.__getattribute__``) through the attributes."""
    if not torch.compiler.is_compiling() and _reads_directly(type(config)):
        values = object.__getattribute__(config, "__dict__")
        implementation = values.get("_attn_implementation_internal", _MISSING)
        output_attentions = values.get("_output_attentions", _MISSING)
        if implementation is not _MISSING and output_attentions is not _MISSING:
            return implementation, output_attentions
    return config._attn_implementation, config.output_attentions


_MISSING = object()


def unobserved(*modules: nn.Module) -> bool:
    """Nothing observes a call of any of these modules (see the module docstring, types aside)."""
    if any(_GLOBAL_HOOKS) or torch._C._get_tracing_state() is not None:
        return False
    return not any(_observed(module) for module in modules)


def linear(hidden_states, module: nn.Linear):
    """``nn.Linear``'s forward, without the module call."""
    parameters = module._parameters
    return F.linear(hidden_states, parameters["weight"], parameters["bias"])


def dropout(hidden_states, module: nn.Dropout):
    """``nn.Dropout``'s forward, without the module call: out of training, or at p = 0, its input
    itself, as ``F.dropout`` returns it (whose argument checks cost a call's host time)."""
    if not module.training or module.p == 0.0:
        return hidden_states
    return F.dropout(hidden_states, module.p, module.training, module.inplace)


def add_layer_norm(hidden_states, residual, norm: nn.LayerNorm, **kwargs):
    """``norm(hidden_states + residual)`` through ``ops.add_layer_norm`` (``x_scale``: of
    ``hidden_states``, ``return_sum``: passed on)."""
    parameters = norm._parameters
    return ops.add_layer_norm(hidden_states, residual, parameters["weight"], parameters["bias"], eps=norm.eps, **kwargs)


def activation_call(activation, hidden_states):
    """A layer's activation: a module (its hooks checked by ``unobserved``) or a function."""
    return activation.forward(hidden_states) if isinstance(activation, nn.Module) else activation(hidden_states)


def lean_attention(module, hidden_states, linears, head_dim, attention_mask, *, dropout, scale, is_causal=False):
    """What transformers' self-attention module computes through ``d2v_kernels_attention_forward``
    (no attentions asked for), without its module and registry calls: (B, N, H * d)."""
    q, k, v = qkv_projection(module, hidden_states, linears, head_dim)
    context = ops.attention(
        q, k, v, **mask_arguments(attention_mask, q, k, is_causal), dropout_p=float(dropout), scale=scale
    )
    return context.flatten(-2)


def training_node_options(drop: nn.Dropout, output_drop: nn.Dropout, activation) -> tuple[float, str] | None:
    """(the hidden dropout probability in force, the GELU's approximation) of a layer whose training
    forward may run as one autograd node (``ops.post_ln_layer_op``, ``ops.pre_ln_layer_op``), or
    None where it may not: its two hidden dropouts differ, or its activation is not a GELU."""
    hidden_dropout = drop.p if drop.training else 0.0
    if hidden_dropout != (output_drop.p if output_drop.training else 0.0):
        return None
    approximate = gelu_approximation(activation)
    return None if approximate is None else (float(hidden_dropout), approximate)


def weights_and_biases(*modules: nn.Module) -> list:
    """[weight, bias, weight, bias, ...] of ``modules`` (linears, LayerNorms), read without module
    attribute lookups."""
    params = []
    for module in modules:
        parameters = module._parameters
        params += (parameters["weight"], parameters["bias"])
    return params
