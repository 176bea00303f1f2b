"""Eager calls of the custom ops without torch.library's dispatch.

A custom op (``torch.library.custom_op`` + ``register_autograd``) is what torch.compile traces as
one opaque node. Called eagerly it costs several microseconds of Python per call beyond a plain
``torch.autograd.Function`` (its autograd wrapper and the dispatcher), which is much of a
small-batch forward that makes dozens of such calls. So the ops' eager calls avoid it: attention
and add_layer_norm through a Function around their plan's launch (:func:`register_traced_autograd`
registers the custom op's backward for traced calls only), the others through
:func:`eager_or_compiled`: on real tensors the same implementation, ``setup_context`` and
``backward`` run through an autograd.Function; under torch.compile, export or any tracing the
custom op runs. Both paths share every line that computes, and the tests run both (eager
everywhere, compiled in the compile and opcheck tests)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from d2v_kernels.dispatch import functorch_active


def autograd_function(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> type:
    """A torch.autograd.Function running ``forward(*inputs)`` (a custom op's implementation) with
    the custom op's ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``.

    The backward is once-differentiable, as the custom op's is (its backward op has no autograd).
    ``forward`` takes ``ctx`` and calls ``setup_context`` itself: a Function with a separate
    ``setup_context`` binds its arguments through ``inspect.signature`` on every call.
    """

    def forward_with_ctx(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward_with_ctx),
            "backward": staticmethod(once_differentiable(backward)),
            "implementation": staticmethod(forward),
        },
    )


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

# A functorch wrapper (inside torch.func.grad / vmap, or one left over from a finished transform)
# is a plain torch.Tensor by type: the custom op takes it, through functorch's own rules.
_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False)


def direct_apply(function: type) -> Callable:
    """``function.apply`` less the Python wrapper's per-call work, for a Function without a
    ``setup_context`` called where :func:`runs_eagerly` holds for its tensors (no functorch
    wrapper among them).

    ``Function.apply`` unwraps dead functorch wrappers from the arguments (a generator over them
    all, several microseconds) before the C++ ``apply`` its ``super()`` holds; with no functorch
    transform active and no wrapper among the arguments that is the identity, so this calls the
    C++ ``apply`` itself, and ``Function.apply`` whenever a transform is active. Found by structure:
    where this torch has no C++ ``apply``, ``function.apply``."""
    python_apply = function.apply
    c_apply = getattr(super(torch.autograd.Function, function), "apply", None)
    defines_setup_context = "setup_context" in vars(function)
    if c_apply is None or defines_setup_context:
        return python_apply

    def apply(*args):
        if functorch_active():
            return python_apply(*args)
        return c_apply(*args)

    return apply


def runs_eagerly(inputs) -> bool:
    """True when ``inputs`` are real tensors computed now: not under torch.compile, no dispatch mode
    (FakeTensorMode, make_fx and non-strict export tracing, functionalization) and no tensor
    subclass among them (FakeTensor, FunctionalTensor, DTensor...). Anything else goes through the
    custom op, which has fake and functional implementations."""
    if torch.compiler.is_compiling() or current_dispatch_mode() is not None:
        return False
    return all(
        type(t) in _PLAIN_TENSOR_TYPES and not _functorch_wrapped(t) for t in inputs if isinstance(t, torch.Tensor)
    )


def eager_or_compiled(custom_op: Callable, function: type) -> Callable:
    """``call(*inputs)``: on real tensors the autograd.Function, or its forward alone when no
    gradient is recorded (inference: no graph node, no saved tensors); else the custom op."""
    apply, implementation = direct_apply(function), function.implementation

    def call(*inputs):
        if not runs_eagerly(inputs):
            return custom_op(*inputs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs if isinstance(t, torch.Tensor)):
            return apply(*inputs)
        return implementation(*inputs)

    return call


def without_zero_grads(setup_context: Callable, backward: Callable) -> tuple[Callable, Callable]:
    """(setup_context, backward) for which autograd hands the backward None, not a tensor of zeros,
    for an output that got no gradient: the statistics outputs (marked non-differentiable, never
    used downstream) would otherwise each cost an allocation and a fill, a memset launch on a GPU,
    on every backward. A backward whose every gradient is None returns None for every input."""

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)

    def backward_of_given_grads(ctx, *grads):
        if all(g is None for g in grads):
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, *grads)

    return setup, backward_of_given_grads


def register_traced_autograd(custom_op, setup_context: Callable, backward: Callable) -> Callable:
    """Give ``custom_op`` its ``backward`` (None for an output without a gradient:
    :func:`without_zero_grads`) and return it: for an op whose eager calls have a Function of
    their own (around a plan's launch), so only traced calls and tensor subclasses reach this."""
    setup_context, backward = without_zero_grads(setup_context, backward)
    custom_op.register_autograd(backward, setup_context=setup_context)
    return custom_op


def register_autograd(
    custom_op, name: str, forward: Callable, setup_context: Callable, backward: Callable
) -> tuple[type, Callable]:
    """Give ``custom_op`` its ``backward`` and return (the twin autograd.Function named ``name``,
    the op's eager-or-compiled call): one registration for the traced path and the eager one.
    ``backward`` gets None for an output without a gradient (:func:`without_zero_grads`)."""
    setup_context, backward = without_zero_grads(setup_context, backward)
    custom_op.register_autograd(backward, setup_context=setup_context)
    function = autograd_function(name, forward, setup_context, backward)
    return function, eager_or_compiled(custom_op, function)


def pick(custom_op: Callable, implementation: Callable, inputs) -> Callable:
    """For a backward: its implementation on real tensors, else the custom op (being traced)."""
    return implementation if runs_eagerly(inputs) else custom_op


try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode as current_dispatch_mode
except ImportError:  # pragma: no cover - a torch without it: always take the custom op

    def current_dispatch_mode():
        return True


try:
    _top_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks
except AttributeError:  # pragma: no cover - a torch without it: always through save_for_backward
    _top_saved_tensors_hooks = None
# Whether the backward running now keeps its graph (``retain_graph``); where this torch lacks it,
# tensors are always saved through save_for_backward (:func:`keep_for_backward`).
_keeps_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def backward_keeps_graph() -> bool:
    """Whether the backward running now keeps its graph (``retain_graph``); True where this torch
    cannot tell."""
    return True if _keeps_graph is None else _keeps_graph()


def saved_tensors_hooks_active() -> bool:
    """Whether tensors saved for a backward go through ``saved_tensors_hooks`` (checkpointing,
    offloading, a test that counts them), which then own what the backward gets back."""
    return _top_saved_tensors_hooks is None or _top_saved_tensors_hooks(False) is not None


def keep_for_backward(ctx, inputs: tuple, made: tuple) -> None:
    """Save a Function's tensors for its backward: ``inputs`` (its inputs and views of them) through
    ``save_for_backward``, so that autograd still reports one modified in place before the
    backward; ``made`` (tensors its forward made, which nothing else can reach) on the context, where
    keeping them costs no SavedVariable each (about a microsecond apiece on the host). Where
    saved-tensor hooks run, or this torch cannot tell whether a backward keeps its graph, all go
    through ``save_for_backward``. :func:`kept_for_backward` returns them."""
    if _keeps_graph is None or saved_tensors_hooks_active():
        ctx.save_for_backward(*inputs, *made)
        ctx.made = len(inputs)
    else:
        ctx.save_for_backward(*inputs)
        ctx.made = made


def kept_for_backward(ctx) -> tuple[tuple, tuple]:
    """(inputs, made) as :func:`keep_for_backward` got them. The context lets the made tensors go
    unless this backward keeps its graph (``retain_graph``), as autograd frees SavedVariables: a
    second backward through a freed graph raises autograd's error from ``saved_tensors``."""
    saved, made = ctx.saved_tensors, ctx.made
    if type(made) is int:
        return saved[:made], saved[made:]
    if not _keeps_graph():
        ctx.made = None
    return saved, made


class _Unrecorded:
    """The context of a Function's forward run without autograd (no node): what it keeps for a
    backward is dropped."""

    __slots__ = ()

    def save_for_backward(self, *tensors) -> None:
        pass

    def __setattr__(self, name, value) -> None:
        pass


UNRECORDED = _Unrecorded()
