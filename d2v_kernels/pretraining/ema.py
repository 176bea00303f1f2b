"""The EMA teacher: a copy of the student whose weights follow ``d * teacher + (1 - d) * student``.

The copy is a whole model of the student's class; the submodules it shares with the student
(``ema_transformer_only``) are the student's own module objects, so they are neither copied nor
averaged. The update is a multi-tensor ``torch._foreach_lerp_`` over every parameter the teacher
does not share (a few kernel launches, not one per tensor), then ``torch._foreach_copy_`` of the
unshared buffers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def annealed_decay(start: float, end: float, updates: int, anneal_end: int) -> float:
    """fairseq's schedule: linear from ``start`` (0 updates) to ``end`` (``anneal_end`` updates), then ``end``."""
    if start == end or updates >= anneal_end:
        return end
    if updates <= 0:
        return start
    return end - (end - start) * (1.0 - updates / anneal_end)


def make_teacher(student: nn.Module, shared: tuple[nn.Module, ...]) -> nn.Module:
    """A deep copy of ``student`` that holds the ``shared`` modules themselves; its own parameters
    do not require grad."""
    teacher = copy.deepcopy(student, memo={id(module): module for module in shared})
    own = shared_tensor_ids(shared)
    for parameter in teacher.parameters():
        if id(parameter) not in own:
            parameter.requires_grad_(False)
    return teacher


def shared_tensor_ids(shared: tuple[nn.Module, ...]) -> set[int]:
    return {id(t) for module in shared for t in (*module.parameters(), *module.buffers())}


def _slots(teacher: nn.Module, student: nn.Module, shared: tuple[nn.Module, ...], kind: str):
    """(teacher module, student module, name) of each unshared parameter or buffer: looked up on
    every update, so a parameter replaced on the student (FSDP2's ``fully_shard``) is followed."""
    skip = {id(m) for module in shared for m in module.modules()}
    students = dict(student.named_modules(remove_duplicate=False))
    slots = {}  # by the teacher tensor: a tensor tied between modules is updated once
    for path, module in teacher.named_modules(remove_duplicate=False):
        if id(module) in skip:
            continue
        tensors = module._parameters if kind == "parameters" else module._buffers
        for name, tensor in tensors.items():
            if tensor is not None:
                slots.setdefault(id(tensor), (module, students[path], name))
    return tuple(slots.values())


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2-sharded student) gathered whole; any other tensor as it is."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


class EMAUpdate:
    """``update(decay)``: the teacher's unshared parameters lerp towards the student's by
    ``1 - decay``; its unshared buffers become the student's."""

    def __init__(self, teacher: nn.Module, student: nn.Module, shared: tuple[nn.Module, ...]):
        self.parameters = _slots(teacher, student, shared, "parameters")
        self.buffers = _slots(teacher, student, shared, "buffers")

    @torch.no_grad()
    def update(self, decay: float) -> None:
        if decay < 1.0:
            ours = [t._parameters[name] for t, _, name in self.parameters]
            theirs = [_full(s._parameters[name]).detach() for _, s, name in self.parameters]
            if ours:
                torch._foreach_lerp_(ours, theirs, 1.0 - decay)
        if self.buffers:
            torch._foreach_copy_(
                [t._buffers[name] for t, _, name in self.buffers],
                [_full(s._buffers[name]) for _, s, name in self.buffers],
            )
