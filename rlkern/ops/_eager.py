"""Eager calls that bypass the custom-op dispatcher (CONTRIBUTING.md, Code): the same forward,
backward and saved state as the custom op, without its autograd wrapper, which costs several times
the kernels at a loss's batch size. torch.compile, torch.func and tensor subclasses go through the
custom op."""

from __future__ import annotations

import torch
from torch import Tensor


def may_bypass(t: Tensor) -> bool:
    """Whether a call with ``t`` may bypass the dispatcher: a plain tensor, not while compiling or
    under torch.func."""
    return (type(t) in (Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def function(name: str, impl, setup_context, backward, doc: str) -> type:
    """The custom op ``impl`` / ``setup_context`` / ``backward`` as an autograd.Function whose
    outputs after the first are not differentiable. The forward takes ctx (no setup_context
    staticmethod): torch 2.13 binds a setup_context Function's arguments through
    inspect.signature on every call."""

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    return type(name, (torch.autograd.Function,), {"__doc__": doc, "forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})
