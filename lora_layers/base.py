"""The shared LoRA base: rank, alpha, scaling, dropout, merge state and merge arithmetic.

Every layer in :mod:`lora_layers` subclasses the ``torch.nn`` layer it replaces *and*
:class:`LoRALayer`. The torch parent owns the pretrained ``weight`` / ``bias`` (so their
state-dict keys are exactly ``nn.Linear``'s, ``nn.Embedding``'s, ...), :class:`LoRALayer`
owns everything LoRA, and each subclass only says how its delta weight and its LoRA branch
are computed.

Merging never touches ``weight``. The merged weight

    W' = (W.to(c) + delta_weight()).to(W.dtype)

is computed in ``c``, float64 when the weight or ``lora_A`` / ``lora_B`` are float64 and
float32 otherwise (never below the weight's precision), rounded once and kept in a separate
non-persistent buffer ``merged_weight``. Unmerging drops that buffer, so the base weight is
bit-identical to the original after any number of merges, and ``state_dict()`` always holds
the original weight.
With DoRA (``use_dora=True``, :mod:`lora_layers.dora`) each row of the sum is multiplied by
``m / ||W + delta||`` (its norm taken in ``c``) before that one rounding.
The cost is one extra weight-sized tensor per layer while it is merged; ``merge_and_unload``
(in :mod:`lora_layers.surgery`) frees it by making the merged tensor the layer's only weight.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
import weakref
from typing import Any, ClassVar

import torch
from torch import nn

from .dora import DoRAMixin
from .functional import transforms_active
from .reentrant import reentrant_checkpoint_inputs_need_grad

__all__ = [
    "AlreadyWrappedError",
    "LoRALayer",
    "check_lora_args",
    "check_wrappable",
    "lora_scaling",
    "refuse_fan_in_fan_out",
]


def check_lora_args(r: object, lora_alpha: object, lora_dropout: object) -> None:
    """Validate the arguments every LoRA layer takes.

    Args:
        r: The rank; a non-negative ``int``.
        lora_alpha: The scaling numerator; a finite real number, positive when ``r > 0``.
        lora_dropout: Dropout probability on the LoRA branch's input, in ``[0, 1)``.

    Raises:
        TypeError: If ``r`` is not an int or ``lora_alpha`` / ``lora_dropout`` are not numbers.
        ValueError: If ``r < 0``, ``lora_alpha`` is NaN or infinite, ``lora_alpha <= 0``
            with ``r > 0``, or ``lora_dropout`` is outside ``[0, 1)``.
    """
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r must be a non-negative int, got {r!r} ({type(r).__name__})")
    if r < 0:
        raise ValueError(f"r must be a non-negative int, got r={r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise TypeError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    try:
        finite = math.isfinite(lora_alpha)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ValueError(f"lora_alpha must be a finite number, got lora_alpha={lora_alpha}")
    if r > 0 and not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be > 0 when r > 0, got lora_alpha={lora_alpha}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real):
        raise TypeError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got lora_dropout={lora_dropout}")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The LoRA scaling, computed here only: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

    Args:
        r: The rank (0: no update, scaling 0).
        lora_alpha: The scaling numerator.
        use_rslora: Rank-stabilised scaling.

    Returns:
        float: The factor the update ``B @ A`` is multiplied by.
    """
    if r == 0:
        return 0.0
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


class AlreadyWrappedError(ValueError, TypeError):
    """A module that already has LoRA was given to be wrapped again.

    A ``ValueError`` (the module is in the wrong state) and, for code written against
    ``from_module``'s earlier contract, a ``TypeError``.
    """


def refuse_fan_in_fan_out(fan_in_fan_out: bool, layer: str, why: str = "") -> None:
    """Raise for ``fan_in_fan_out=True`` on a layer whose weight layout is fixed.

    Raises:
        ValueError: If ``fan_in_fan_out`` is True (the message names ``layer``).
    """
    if fan_in_fan_out:
        raise ValueError(f"fan_in_fan_out=True makes no sense for {layer}{why}; drop the argument")


def check_wrappable(
    module: nn.Module, expected: type | tuple[type, ...], name: str | None = None
) -> None:
    """Check that ``module`` can get LoRA: the one check every wrapping path runs.

    Args:
        module: The layer to wrap.
        expected: The torch layer type(s) the LoRA layer replaces.
        name: The module's dotted name, for the messages (None: its type names it).

    Raises:
        AlreadyWrappedError: If ``module`` already has LoRA (unload it first).
        TypeError: If ``module`` is not an instance of ``expected``.
    """
    if isinstance(module, LoRALayer):
        what = type(module).__name__ if name is None else f"{name!r}"
        kind = "" if name is None else f" ({type(module).__name__})"
        raise AlreadyWrappedError(
            f"{what} already has LoRA{kind}; unload it (unload(model) or "
            "merge_and_unload(model)) before wrapping it again"
        )
    if not isinstance(module, expected):
        names = (
            expected.__name__
            if isinstance(expected, type)
            else " or ".join(t.__name__ for t in expected)
        )
        raise TypeError(
            f"from_module expects {names}, got {type(module).__name__}; "
            "supported: nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d"
        )


def _is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` shard (FSDP2 ``fully_shard``, tensor parallel)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor exists unless imported
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place version counter of ``tensor``; None for inference tensors (they have none)."""
    return None if tensor.is_inference() else tensor._version


class LoRALayer(DoRAMixin):
    """Mixin holding the LoRA hyper-parameters, the merge state and the merge arithmetic.

    Subclasses call :meth:`_setup_lora` in ``__init__`` after the torch parent built the base
    parameters, then implement :meth:`delta_weight` and ``forward``.

    Attributes:
        r: Rank of the update (0: a plain layer with no LoRA parameters).
        lora_alpha: Scaling numerator.
        scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``.
        use_rslora: Whether rank-stabilised scaling is used.
        lora_dropout: ``nn.Dropout`` on the LoRA branch's input, or ``nn.Identity`` when p=0.
        merge_weights: If True, ``eval()`` merges and ``train()`` unmerges (loralib's contract).
        disable_adapters: If True, the layer computes its base output only.
        merged_weight: The merged weight while merged, else None (non-persistent buffer).
    """

    r: int
    lora_alpha: float
    scaling: float
    use_rslora: bool
    merge_weights: bool
    disable_adapters: bool
    lora_dropout: nn.Module
    merged_weight: torch.Tensor | None
    weight: nn.Parameter
    #: The torch layer type(s) this LoRA layer replaces: what ``from_module`` accepts.
    wraps: ClassVar[type[nn.Module]]

    def _setup_lora(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        merge_weights: bool,
        use_rslora: bool,
        active: bool = True,
        use_dora: bool = False,
    ) -> None:
        check_lora_args(r, lora_alpha, lora_dropout)
        self._setup_dora(use_dora, r)  # DoRA: see lora_layers.dora
        self.r = int(r) if active else 0  # inactive: e.g. a MergedLinear with no enabled slice
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.scaling = self._compute_scaling(self.r)
        self.merge_weights = bool(merge_weights)
        self.disable_adapters = False
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.register_buffer("merged_weight", None, persistent=False)
        self._merged_from: tuple = ()  # what the merge was made from (see _merge_is_stale)
        if self.r > 0:
            # The pretrained weight is frozen, as in loralib; the bias keeps its own setting.
            self.weight.requires_grad_(False)

    def adopt(self, module: nn.Module, lora_dtype: torch.dtype | None) -> None:
        """Take ``module``'s own ``weight``/``bias`` Parameters (shared, never copied).

        Called by ``from_module`` (and the layer-kind registry, :mod:`lora_layers.kinds`) on a
        layer built on the meta device; the LoRA parameters are then created on the weight's
        device, so meta-device models stay on meta.

        Args:
            module: The layer whose Parameters to take.
            lora_dtype: Dtype of the LoRA parameters (None: the weight's).
        """
        self.weight = module.weight
        self.bias = getattr(module, "bias", None)  # nn.Embedding has no bias attribute
        if self.r > 0:
            self.weight.requires_grad_(False)
        self._init_lora_parameters(self.weight.device, lora_dtype or self.weight.dtype)
        # Copy the mode without merging: an eval-mode layer merges on its next eval() call.
        nn.Module.train(self, module.training)

    def lora_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``lora_A`` and ``lora_B`` (each layer kind says its own)."""
        raise NotImplementedError

    def _init_lora_parameters(self, device: torch.device, dtype: torch.dtype) -> None:
        if self.r == 0:
            return
        shape_a, shape_b = self.lora_shapes()
        self.lora_A = nn.Parameter(torch.empty(shape_a, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(shape_b, device=device, dtype=dtype))
        self._init_dora_magnitude(device, dtype)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Each ``(r, in)`` block of A kaiming-uniform (a=sqrt(5)), as its own torch layer; B zeros.

        The update ``B @ A`` is then exactly zero; layers that initialise otherwise say so.
        """
        if self.r == 0:
            return
        for a_i in self.lora_A.data.split(self.r):  # one (r, in) block per enabled slice
            nn.init.kaiming_uniform_(a_i, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.reset_dora_magnitude()  # DoRA: m = ||W|| again
        self.unmerge()

    @classmethod
    def module_args(cls, module: nn.Module) -> dict[str, Any]:
        """The constructor arguments that rebuild ``module``'s base layer (sizes, settings)."""
        raise NotImplementedError

    def plain_module(self) -> nn.Module:
        """A torch layer of the kind this layer replaces, with its settings and no Parameters.

        Built on the meta device with ``weight`` / ``bias`` set to None, for
        :func:`~lora_layers.unload` to give the Parameters to.
        """
        with torch.device("meta"):
            plain = self.wraps(**self.module_args(self))
        for leaf in ("weight", "bias"):
            if leaf in plain._parameters:
                plain._parameters[leaf] = None
        return plain

    @classmethod
    def from_module(
        cls, module: nn.Module, lora_dtype: torch.dtype | None = None, **lora_args: Any
    ) -> LoRALayer:
        """Wrap an existing torch layer, sharing (not copying) its ``weight`` and ``bias``.

        The new layer is built on the meta device and takes the module's own Parameters, so
        this works on meta-device models; the LoRA parameters are created on the weight's
        device.

        Args:
            module (nn.Module): The layer to wrap, an instance of ``cls.wraps``.
            lora_dtype (torch.dtype | None): Dtype of ``lora_A`` / ``lora_B`` (default: the
                weight's), e.g. ``torch.float32`` on a bf16 base.
            **lora_args: The constructor's LoRA arguments: ``r``, ``lora_alpha``,
                ``lora_dropout`` (not for ``Embedding``), ``merge_weights``, ``use_rslora``,
                ``use_dora``, and ``enable_lora`` / ``split_sizes`` for ``MergedLinear``.

        Returns:
            LoRALayer: A new layer whose ``weight`` / ``bias`` are the module's Parameters.

        Raises:
            TypeError: If ``module`` is not a ``cls.wraps``, or an argument is unknown.
            AlreadyWrappedError: If ``module`` already has LoRA.
            ValueError: For invalid LoRA hyper-parameters (or slices).
        """
        check_wrappable(module, cls.wraps)
        with torch.device("meta"):
            layer = cls(**cls.module_args(module), **lora_args)
        layer.adopt(module, lora_dtype)
        return layer

    def _compute_scaling(self, r: int) -> float:
        return lora_scaling(r, self.lora_alpha, self.use_rslora)

    # ------------------------------------------------------------------ state
    @property
    def merged(self) -> bool:
        """True while the layer holds a merged weight."""
        return self.merged_weight is not None

    @property
    def dropout_p(self) -> float:
        """The dropout probability of the LoRA branch (0.0 without dropout)."""
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def _lora_parameters(self) -> tuple[nn.Parameter, ...]:
        if self.r == 0:
            return ()
        return (self.lora_A, self.lora_B, *self._dora_parameters())

    def _prepare_forward(self) -> None:
        """The explicit steps every forward takes before choosing its path.

        In training mode with grad disabled, the reentrant-checkpoint guard
        (:meth:`_check_gradient_reaches_lora`); and while merged, refreshing a merged weight
        that went stale (a parameter changed in place since the merge: an optimizer step
        taken in eval mode, a load, an init; or was replaced: another adapter's lora_B), so
        the merged path never uses an old one.
        """
        compiling = torch.compiler.is_compiling()
        if self.training and not torch.is_grad_enabled() and not compiling:
            self._check_gradient_reaches_lora()
        if not compiling and self._use_merged() and self._merge_is_stale():
            self._merge_or_warn()  # stays unmerged (with a warning) if the merge overflows

    def _use_merged(self) -> bool:
        """Whether forward may run the merged single-op path (only answers; changes nothing).

        Only while merged, with the adapter on, and when no LoRA gradient is needed: a forward
        that must train the adapter runs the unmerged path so its gradients are exact.
        """
        if self.merged_weight is None or self.disable_adapters:
            return False
        if not torch.compiler.is_compiling() and transforms_active():
            return False  # torch.func may be differentiating the parameters it swapped in
        # The merged weight is detached: a trainable base weight needs the unmerged path too.
        needs_grad = any(p.requires_grad for p in (self.weight, *self._lora_parameters()))
        return not (needs_grad and torch.is_grad_enabled())

    def _merge_source(self) -> tuple:
        """What a merge is made from: per parameter a weak reference, its version, its data."""
        return tuple(
            (weakref.ref(p), _version(p), p.data_ptr())
            for p in (self.weight, *self._lora_parameters())
        ) + (self.scaling,)

    def _merge_is_stale(self) -> bool:
        """Whether ``weight``, ``lora_A``, ``lora_B`` or ``scaling`` changed since the merge.

        Caught: in-place changes to the Parameters (optimizer steps, ``copy_`` / ``nn.init``
        under ``no_grad``, ``load_state_dict``), replacing a Parameter by another object, and
        assigning new ``.data``. Not caught: writing through ``p.data`` (``p.data.add_(...)``,
        which bypasses the version counter) and in-place changes to inference tensors inside
        ``torch.inference_mode()``; call ``merge()`` after those.
        """
        params = (self.weight, *self._lora_parameters())
        source = self._merged_from
        if len(source) != len(params) + 1 or source[-1] != self.scaling:
            return True
        return any(
            ref() is not p or version != _version(p) or ptr != p.data_ptr()
            for (ref, version, ptr), p in zip(source[:-1], params, strict=True)
        )

    def _merge_or_warn(self) -> bool:
        """Merge; if the merged weight would hold NaN/Inf, stay unmerged and warn instead.

        Used by ``eval()`` and by forwards that refresh a stale merge, so that switching a
        model's mode never stops half-way: the unmerged path computes the exact result.

        Returns:
            Whether the layer is merged afterwards.
        """
        try:
            self.merge()
        except ValueError as err:
            self.unmerge()
            warnings.warn(
                f"{err} The layer stays unmerged: its forwards run the exact unmerged path.",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        return True

    def _lora_active(self) -> bool:
        return self.r > 0 and not self.disable_adapters

    def _check_gradient_reaches_lora(self) -> None:
        """Raise instead of letting reentrant checkpointing silently drop the LoRA gradients.

        ``torch.utils.checkpoint(..., use_reentrant=True)`` runs its block without grad and
        replays it in backward only if one of its tensor inputs requires grad. With frozen
        inputs (e.g. frozen embeddings) the replay never happens and every LoRA layer inside
        gets ``None`` gradients (microsoft/LoRA#120). Called by forward in training mode with
        grad disabled.

        Raises:
            RuntimeError: If this layer has trainable LoRA parameters and runs inside a
                reentrant checkpoint none of whose tensor inputs requires grad.
        """
        if not self._lora_active() or not any(p.requires_grad for p in self._lora_parameters()):
            return
        if reentrant_checkpoint_inputs_need_grad() is False:
            raise RuntimeError(
                f"{type(self).__name__} (r={self.r}) runs in training mode inside "
                "torch.utils.checkpoint(use_reentrant=True) whose inputs do not require grad, "
                "so backward would never reach it and lora_A / lora_B would get no gradient. "
                "Fix: pass use_reentrant=False (recommended), or make an input of the "
                "checkpointed block require grad (lora_layers.enable_input_require_grads(model), "
                "or x.requires_grad_()). For a forward without gradients, call model.eval() or "
                "skip checkpointing when not torch.is_grad_enabled(), as transformers does."
            )

    # ------------------------------------------------------------------ merge
    def _merge_dtype(self) -> torch.dtype:
        """The dtype of the merge arithmetic: float64 if any of W, A, B is, else float32."""
        params = (self.weight, *self._lora_parameters())
        return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    def delta_weight(self) -> torch.Tensor:
        """The weight update ``scaling * B @ A`` in the layout of ``self.weight``.

        Computed in float32, or in float64 when the weight or ``lora_A`` / ``lora_B`` are
        float64, so it never loses precision the weight has.

        Returns:
            A float32 (or float64) tensor with ``self.weight``'s shape.
        """
        raise NotImplementedError

    def get_merged_weight(self) -> torch.Tensor:
        """Compute ``(W.to(c) + delta_weight()).to(W.dtype)`` without changing anything.

        ``c`` is float64 if the weight or ``lora_A`` / ``lora_B`` are float64, else float32,
        so the arithmetic never runs below the weight's precision and rounds once. With
        ``B = 0`` the result is bit-identical to ``W`` in every dtype. Inside
        ``torch.inference_mode()`` the result is still a normal tensor, usable by later
        forwards with grad.

        Returns:
            A new tensor with ``self.weight``'s shape, dtype and device.

        Raises:
            ValueError: If the merged weight would hold NaN or Inf.
        """
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self.get_merged_weight()
        weight = self.weight
        with torch.no_grad():
            delta = self.delta_weight()
            # The sum gets the weight's own strides, so the merged layer runs the same kernels.
            merged = torch.empty_like(weight, dtype=delta.dtype, requires_grad=False)
            torch.add(weight.detach().to(delta.dtype), delta, out=merged)
            self._dora_rescale_(merged)  # DoRA: rows times m / ||W + delta||
            merged = merged.to(weight.dtype)
        if merged.device.type != "meta" and not torch.isfinite(merged).all():
            bad = (~torch.isfinite(merged)).sum().item()
            raise ValueError(
                f"merging the LoRA update into {type(self).__name__} would produce {bad} "
                "non-finite (NaN/Inf) weight elements; the weight was left unchanged. "
                "Check lora_A / lora_B for NaN/Inf or overflow in the base dtype."
            )
        return merged

    def merge(self) -> None:
        """Merge the LoRA update into a separate merged weight used by eval forwards.

        The base ``weight`` is never modified. Calling ``merge`` again recomputes the merged
        weight from the current ``lora_A`` / ``lora_B``.

        Raises:
            ValueError: If the merged weight would hold NaN or Inf (nothing is changed).
            RuntimeError: If the parameters are sharded (FSDP2 ``fully_shard``): merge a
                gathered, unsharded copy instead (see ``docs/distributed.md``).
        """
        if self.r == 0:
            return
        if self._sharded():
            raise RuntimeError(
                f"cannot merge {type(self).__name__}: its parameters are sharded DTensors "
                "(FSDP2 fully_shard or tensor parallel), and a merged weight would be a full, "
                "unsharded copy on every rank. Sharded layers run the exact unmerged path; to "
                "merge, load the full adapter state dict into an unsharded model first."
            )
        self.merged_weight = self.get_merged_weight()
        self._merged_from = self._merge_source()

    def _sharded(self) -> bool:
        return any(_is_sharded(p) for p in (self.weight, *self._lora_parameters()))

    def unmerge(self) -> None:
        """Drop the merged weight; the base weight was never modified, so this is exact."""
        self.merged_weight = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # Loading new weights into a merged layer must not leave a stale merged weight.
        super()._load_from_state_dict(*args, **kwargs)
        if self.merged:
            self.unmerge()
            self.merge()

    def train(self, mode: bool = True):
        """Set training mode; with ``merge_weights``, ``eval()`` merges and ``train()`` unmerges.

        Switching never raises half-way through a model: a layer whose merged weight would
        hold NaN/Inf stays unmerged with a ``RuntimeWarning``, and its forwards run the exact
        unmerged path (``merge()`` called directly raises ``ValueError`` instead).

        Args:
            mode: True for training mode, False for evaluation mode.

        Returns:
            The module itself, as ``nn.Module.train`` does.
        """
        super().train(mode)
        if self.merge_weights and self.r > 0:
            if mode:
                self.unmerge()
            elif not self.merged and not self._sharded():  # sharded: stay on the unmerged path
                self._merge_or_warn()
        return self

    def reset_parameters(self) -> None:
        """Re-initialise every parameter, as loralib does.

        ``weight`` and ``bias`` as the torch layer initialises them, then ``lora_A`` /
        ``lora_B`` as :meth:`reset_lora_parameters` (so the update is zero again). Code that
        re-initialises a model by calling ``reset_parameters()`` on each module (Microsoft's
        NLU examples, FSDP2 meta-device recipes) gets a fresh adapter, never a stale one.
        """
        super().reset_parameters()  # the torch parent's
        if getattr(self, "r", 0) > 0:  # the torch parent's __init__ calls this before LoRA exists
            self.reset_lora_parameters()

    def _apply(self, fn, recurse: bool = True):
        # to_empty() moves meta tensors to real memory without initialising it; LoRA
        # parameters that came off the meta device this way are re-initialised (B = 0), so an
        # adapter injected on meta is never garbage. The base weight still needs loading.
        # Sharded (FSDP2) parameters are left to the caller's explicit initialisation.
        lora_on_meta = any(p.is_meta for p in self._lora_parameters())
        super()._apply(fn, recurse)
        materialised = not any(p.is_meta for p in self._lora_parameters())
        if lora_on_meta and materialised and not self._sharded():
            self.reset_lora_parameters()
            self._defer_dora_magnitude()  # W is uninitialised memory until loaded
        return self

    def __getstate__(self) -> dict:
        # Weak references cannot be pickled or deep-copied: a copy re-merges on first use.
        state = self.__dict__.copy()
        state["_merged_from"] = ()
        state["_dora_cache"] = None
        return state

    def lora_extra_repr(self) -> str:
        if self.r == 0:
            return "r=0"
        text = f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"
        if self.dropout_p:
            text += f", lora_dropout={self.dropout_p}"
        if self.use_rslora:
            text += ", use_rslora=True"
        if self.use_dora:
            text += ", use_dora=True"
        return text
