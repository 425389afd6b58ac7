"""Linear layers in the torch backend's weight formats.

- ``DenseLinear``: float32 ``F.linear`` (weight_mode="float32", and norms/biases always).
- ``Int4Linear``: the GGUF types that are 4-bit group-32 affine (Q4_0, Q4_1, Q4_K; see
  ``kernels.blocks``) mapped exactly onto torch's CPU int4 group-32 kernel
  (``_weight_int4pack_mm_for_cpu``, which computes ``(q - 8) * scale + zero``):
  ``zero = bias + 8 * scale``. Scales/zeros are rounded to bfloat16 and the activations
  run in bfloat16.
- ``Int8Linear``: per-output-row symmetric int8 (``_weight_int8pack_mm``) for
  everything else (Q5_x, Q6_K, Q8_0, Q2_K, Q3_K, ... requantized from the library's
  dequantization; float sources), bfloat16 activations. This includes the fallback
  for the head where no quantized engine exists.
- ``DynamicInt8Linear``: the lm_head in quant mode (see ``make_head``).
- ``ConcatLinear``: a fused projection (q|k|v, gate|up) whose parts need different
  kernels (a file may store q as Q4_K and v as Q6_K).
- ``QuantEmbedding``: the token embedding in quant mode, the file's blocks as they
  are; a lookup decodes only the rows asked for.

Every layer takes and returns float32 ``(..., in)`` -> ``(..., out)``; only the
matmul itself runs in the low-precision format, the residual stream stays float32.
"""

from __future__ import annotations

import platform
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from kernels.blocks import AFFINE_BITS, Affine
from kernels.weights import QuantTensor, stack_rows


class DenseLinear:
    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        self.weight = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        self.bias = None if bias is None else torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))

    @classmethod
    def sharing(cls, weight: torch.Tensor) -> DenseLinear:
        """A linear over an existing tensor's storage (a tied head over the embedding)."""
        lin = cls.__new__(cls)
        lin.weight, lin.bias = weight, None
        return lin

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)


class Int8Linear:
    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)
        self.bias = None if bias is None else torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.qweight, self.scale)
        y = y.float().reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scale.nbytes + (0 if self.bias is None else self.bias.nbytes)


class DynamicInt8Linear:
    """fbgemm/oneDNN int8 x int8 (weights per-row, activations quantized per call).

    Uses the CPU's int8 dot-product instructions (VNNI): measured on one thread,
    the 49152 x 576 head takes 1.3 ms vs 11.8 ms for ``_weight_int8pack_mm`` and
    9.2 ms in float32.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127.0).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensor creation is deprecated, not gone
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        b = None if bias is None else torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
        self.packed = torch.ops.quantized.linear_prepack(qw, b)
        self.nbytes = qw.int_repr().nbytes + scale.nbytes + (0 if b is None else b.nbytes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=False: full 8-bit activations; safe with VNNI's int32 accumulation
        return torch.ops.quantized.linear_dynamic(x, self.packed, False)


class Int4Linear:
    """Group-32 affine codes on torch's CPU int4 kernel, which computes ``(c - 8) * scale + zero``.

    4-bit codes map directly: ``zero = bias + 8 * scale``. Codes of 5 to 8 bits are split
    into two 4-bit halves side by side along the input (``c = 16 h + l``; the input is
    repeated): ``l`` with ``(scale, 8 * scale)`` and ``h`` with ``(16 * scale, 128 * scale + bias)``
    (8 bits, so Q8_0's zero is 0) or ``h + 8`` with ``(16 * scale, bias)`` (5-7 bits) sum to
    ``scale * c + bias``. The input dimension doubles; measured on this CPU the
    doubled int4 product is still faster than ``_weight_int8pack_mm`` on the same matrix.
    """

    GROUP = 32

    def __init__(self, a: Affine, bias: np.ndarray | None = None):
        if not 4 <= a.bits <= 8:
            raise ValueError(f"Int4Linear takes 4- to 8-bit codes, got {a.bits}-bit")
        codes, scale, bias_g = a.codes, a.scales, a.biases
        if a.bits == 4:
            self.repeat = 1
            zero = bias_g + np.float32(8) * scale
        else:
            # the high half is centred on the kernel's -8 where it fits (5-7 bits: h + 8 <= 15),
            # so its zero is the bias alone and not a near-cancelling 128 * scale + bias
            self.repeat = 2
            high = codes >> 4
            high, high_zero = (high, np.float32(128) * scale + bias_g) if a.bits == 8 else (high + 8, bias_g)
            codes = np.concatenate([codes & 0x0F, high], axis=1)
            scale, zero = (np.concatenate([scale, np.float32(16) * scale], axis=1),
                           np.concatenate([np.float32(8) * scale, high_zero], axis=1))
        q = torch.from_numpy(np.ascontiguousarray(codes)).to(torch.int32)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        # kernel layout: (in // 32, out, 2) with [..., 0] = scale, [..., 1] = zero
        self.scales_zeros = torch.stack([torch.from_numpy(scale).t(), torch.from_numpy(zero).t()],
                                        dim=-1).to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.repeat == 2:
            x2 = torch.cat([x2, x2], dim=-1)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.GROUP, self.scales_zeros)
        y = y.float().reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return (self.packed.nbytes + self.scales_zeros.nbytes
                + (0 if self.bias is None else self.bias.nbytes))


class ConcatLinear:
    """Several linears over the same input, outputs side by side."""

    def __init__(self, parts: list[Linear]):
        self.parts = parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


class QuantEmbedding:
    """Rows of a GGUF block matrix by token id, decoded per lookup (exactly the file's
    values; no float copy of the vocabulary)."""

    def __init__(self, qt: QuantTensor):
        self.qt = qt

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.qt.rows(ids.numpy()))

    @property
    def nbytes(self) -> int:
        return self.qt.nbytes


Linear = DenseLinear | Int8Linear | Int4Linear | DynamicInt8Linear | ConcatLinear


def _dense(t: np.ndarray | QuantTensor) -> np.ndarray:
    return t.dequantize() if isinstance(t, QuantTensor) else t


def _kernel(t: np.ndarray | QuantTensor) -> str:
    """Which quant-mode kernel a matrix goes to: int4 for the 4-bit affine types, split int4
    for Q8_0 (exact, and faster than int8 with a per-row scale); per-row int8 for the rest.
    Q5_x would also split exactly, but at 1.25 bytes per weight against int8's 1.06."""
    if isinstance(t, QuantTensor):
        bits = AFFINE_BITS.get(t.type_name)
        if bits == 4:
            return "int4"
        if bits == 8:
            return "int4x2"
    return "int8"


def _int4(parts: list[QuantTensor], bias: np.ndarray | None) -> Int4Linear:
    if len({p.type_name for p in parts}) == 1:
        return Int4Linear(stack_rows(parts).affine(), bias)
    affines = [p.affine() for p in parts]
    return Int4Linear(Affine(*(np.concatenate([getattr(a, f) for a in affines])
                               for f in ("codes", "scales", "biases")), affines[0].bits), bias)


def make_head(w: np.ndarray | QuantTensor, weight_mode: str) -> Linear:
    """The lm_head (vocab x hidden), the largest matrix: in quant mode dynamic int8 on the
    CPU's int8 dot-product path, whose logits are float32.

    The int4 and int8-weight kernels return bfloat16, which rounds logits of ~25 to steps
    of 0.125 and ties the top tokens (measured: SmolLM2's first greedy token of a test
    prompt changed with the head exact on int4, 504 and 60 both at 25.125). The cost is
    the activations' int8 rounding: measured on the last position of a chat prompt, the
    head alone moves the logits by 1.4% (relative L2) on SmolLM2's 49152 x 576 Q8_0 head,
    5.0% on Qwen2.5-0.5B's 151936 x 896 Q8_0 and 2.9% on Qwen2.5-1.5B's Q6_K head
    (against 0.7-0.8% for ``Int8Linear`` at 2-3x the time, and bfloat16 logits)."""
    if weight_mode == "float32":
        return make_linear([w], None, weight_mode)
    dense = _dense(w)
    if not int8_dot_products():
        return Int8Linear(dense)
    try:
        return DynamicInt8Linear(dense)
    except (RuntimeError, AttributeError):  # no quantized engine in this torch build
        return Int8Linear(dense)


def int8_dot_products() -> bool:
    """Whether DynamicInt8Linear is exact here: an x86 CPU needs VNNI (int8 products summed
    in int32). Without it the kernels pair the products in saturating int16, and full-range
    activations overflow: the head's logits moved by ~5 of ~25 on an AVX2-only CPU
    (measured), and they depended on which sessions shared the batch."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # Arm's dot-product instructions accumulate in int32
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(check()) if check is not None else False


def make_linear(parts: list[np.ndarray | QuantTensor], biases: list[np.ndarray] | None,
                weight_mode: str) -> Linear:
    """One linear layer over the row-concatenation of ``parts``."""
    bias = None if not biases else np.concatenate(biases)
    if weight_mode == "float32":
        return DenseLinear(np.concatenate([_dense(p) for p in parts]) if len(parts) > 1 else _dense(parts[0]), bias)
    runs: list[list[np.ndarray | QuantTensor]] = []  # consecutive parts that share a kernel
    for p in parts:
        if runs and _kernel(runs[-1][-1]) == _kernel(p):
            runs[-1].append(p)
        else:
            runs.append([p])
    linears, row = [], 0
    for run in runs:
        n = sum(p.shape[0] for p in run)
        b = None if bias is None else bias[row:row + n]
        row += n
        if _kernel(run[0]) != "int8":
            linears.append(_int4(run, b))
        else:
            linears.append(Int8Linear(np.concatenate([_dense(p) for p in run]) if len(run) > 1
                                      else _dense(run[0]), b))
    return linears[0] if len(linears) == 1 else ConcatLinear(linears)
