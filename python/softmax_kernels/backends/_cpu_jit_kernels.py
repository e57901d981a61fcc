"""Compiled CPU kernels (numba) for the NumPy backend's fast path; imported only by ``_cpu_jit``
on first use, never at package import (``import numba`` costs ~0.3 s).

Everything numba-specific lives in this one file on purpose: numba's on-disk cache
(``cache=True``) is invalidated by a change to the file that defines a cached function, not by a
change to the helpers it calls from other files.

SIMD. The kernels are written with explicit 16-lane vectors (a small numba type, ``Vec``, whose
LLVM representation is ``<16 x float>`` / ``<16 x double>``) instead of relying on the
auto-vectoriser: numba ships with LLVM's SLP vectoriser switched off (numba #8705) and the loop
vectoriser will not vectorise a floating-point sum without fastmath (it would reorder it). With
explicit lanes every row sum has one fixed order -- element j goes to lane j % 16 of one of a
fixed number of accumulators, the lanes are combined by a fixed pairwise tree -- so a row's
result depends only on the row: bitwise the same for any blocking, thread count, alignment, and
on any x86-64 (LLVM splits a 16-lane vector into the registers the machine has; FMAs are
explicit ``llvm.fma``, never contracted from a multiply and an add).

Data is addressed by raw addresses (``ndarray.ctypes.data``) and element offsets, so every kernel
has one signature per dtype whatever the arrays' layout, writeability or aliasing (in place
``out=x``, broadcast masks with row stride 0): no recompilation per layout, and no aliasing
assumption the compiler could exploit. The caller guarantees the addresses and extents.

float16 is loaded as 16-bit lanes and widened to float32 inside the load (``vcvtph2ps`` with
F16C/AVX-512), results are narrowed inside the store (``vcvtps2ph``, round to nearest even,
subnormals exact): no separate conversion pass.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

W = 16  # lanes per vector

# error_model="numpy": IEEE division (1 / 0 = inf), no Python ZeroDivisionError checks
_JIT = dict(nogil=True, fastmath=False, cache=True, error_model="numpy")


# ----------------------------------------------------------------------------------------------
# The vector types


class Vec(types.Type):
    """W lanes of float32 or float64."""

    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"Vec{W}({dtype})")


class Mask(types.Type):
    """W lanes of bool (LLVM <W x i1>)."""

    def __init__(self):
        super().__init__(name=f"Mask{W}")


MASK = Mask()


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        elem = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(elem, W))


@register_model(Mask)
class _MaskModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.IntType(1), W))


_I1, _I8, _I16, _I32, _I64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
_F16, _F32, _F64 = ir.HalfType(), ir.FloatType(), ir.DoubleType()


def _storage(tag):
    """(LLVM storage type, numba compute type) of a dtype tag: a scalar argument whose numba
    type names the array's element type; uint16 stands for float16 (numba has no float16)."""
    if tag == types.uint16:
        return _I16, types.float32
    if tag == types.float32:
        return _F32, types.float32
    if tag == types.float64:
        return _F64, types.float64
    if tag == types.int64:
        return _I64, types.int64
    if tag == types.boolean or tag == types.uint8:
        return _I8, types.boolean
    raise TypeError(f"no storage for {tag}")


def _llvm(nbtype):
    return {types.float32: _F32, types.float64: _F64, types.int64: _I64}[nbtype]


def _vt(elem):
    return ir.VectorType(elem, W)


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(
        v, ir.Constant(vty, ir.Undefined), ir.Constant(_vt(_I32), [0] * W)
    )


def _vconst(vty, c):
    return ir.Constant(vty, [c] * W)


def _elem_ptr(builder, addr, idx, st):
    p = builder.inttoptr(addr, st.as_pointer())
    return builder.gep(p, [idx], source_etype=st)


def _lanes(builder, cnt):
    """<W x i1>: lane k < cnt."""
    c = _splat(builder, builder.trunc(cnt, _I32), _vt(_I32))
    return builder.icmp_signed("<", ir.Constant(_vt(_I32), list(range(W))), c)


def _fma(builder, a, b, c):
    """llvm.fma on lanes (llvmlite's builder.fma takes scalars only)."""
    vty = a.type
    fnty = ir.FunctionType(vty, [vty, vty, vty])
    name = f"llvm.fma.v{vty.count}{_suffix(vty.element)}"
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), [a, b, c])


def _suffix(t):
    return {_F32: "f32", _F64: "f64", _I16: "i16", _I8: "i8", _I64: "i64"}[t]


def _masked_load(builder, ptr, st, lanes):
    vty = _vt(st)
    fnty = ir.FunctionType(vty, [ptr.type, _I32, lanes.type, vty])
    fn = cgutils.get_or_insert_function(
        builder.module, fnty, f"llvm.masked.load.v{W}{_suffix(st)}.p0"
    )
    size = st.width // 8 if isinstance(st, ir.IntType) else (4 if st == _F32 else 8)
    return builder.call(fn, [ptr, ir.Constant(_I32, size), lanes, ir.Constant(vty, None)])


def _masked_store(builder, value, ptr, st, lanes):
    vty = _vt(st)
    fnty = ir.FunctionType(ir.VoidType(), [vty, ptr.type, _I32, lanes.type])
    fn = cgutils.get_or_insert_function(
        builder.module, fnty, f"llvm.masked.store.v{W}{_suffix(st)}.p0"
    )
    size = st.width // 8 if isinstance(st, ir.IntType) else (4 if st == _F32 else 8)
    builder.call(fn, [value, ptr, ir.Constant(_I32, size), lanes])


def _widen(builder, raw, st):
    """storage lanes -> compute lanes (float16 -> float32; others unchanged)."""
    if st == _I16:
        return builder.fpext(builder.bitcast(raw, _vt(_F16)), _vt(_F32))
    return raw


def _narrow(builder, v, vdtype, st):
    """compute lanes (float32 / float64) -> storage lanes."""
    src = _llvm(vdtype)
    if st == _I16:
        if src == _F64:
            v = builder.fptrunc(v, _vt(_F32))
        return builder.bitcast(builder.fptrunc(v, _vt(_F16)), _vt(_I16))
    if src == st:
        return v
    return builder.fptrunc(v, _vt(st)) if src == _F64 else builder.fpext(v, _vt(st))


# ----------------------------------------------------------------------------------------------
# Loads and stores (addr: int64 address, idx: element offset)


@intrinsic
def vld(typingctx, tag, addr, idx):
    """W elements at addr[idx:idx + W] in the compute type."""
    st, ct = _storage(tag)
    sig = Vec(ct)(tag, addr, idx)

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(builder, args[1], args[2], st)
        raw = builder.load(builder.bitcast(ptr, _vt(st).as_pointer()), typ=_vt(st), align=1)
        return _widen(builder, raw, st)

    return sig, codegen


@intrinsic
def vld_part(typingctx, tag, addr, idx, cnt, fill):
    """The first cnt elements at addr[idx:]; lanes >= cnt are `fill` (nothing read there)."""
    st, ct = _storage(tag)
    sig = Vec(ct)(tag, addr, idx, cnt, fill)

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(builder, args[1], args[2], st)
        lanes = _lanes(builder, args[3])
        v = _widen(builder, _masked_load(builder, ptr, st, lanes), st)
        f = context.cast(builder, args[4], sig.args[4], ct)
        return builder.select(lanes, v, _splat(builder, f, v.type))

    return sig, codegen


@intrinsic
def vst(typingctx, tag, addr, idx, v):
    st, _ct = _storage(tag)
    sig = types.none(tag, addr, idx, v)

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(builder, args[1], args[2], st)
        raw = _narrow(builder, args[3], sig.args[3].dtype, st)
        builder.store(raw, builder.bitcast(ptr, _vt(st).as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vst_part(typingctx, tag, addr, idx, cnt, v):
    """Stores the first cnt lanes of v at addr[idx:]; nothing is written beyond."""
    st, _ct = _storage(tag)
    sig = types.none(tag, addr, idx, cnt, v)

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(builder, args[1], args[2], st)
        raw = _narrow(builder, args[4], sig.args[4].dtype, st)
        _masked_store(builder, raw, ptr, st, _lanes(builder, args[3]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def mld(typingctx, addr, idx):
    """W bools (bytes) at addr[idx:idx + W] as a lane mask."""
    sig = MASK(addr, idx)

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(builder, args[0], args[1], _I8)
        raw = builder.load(builder.bitcast(ptr, _vt(_I8).as_pointer()), typ=_vt(_I8), align=1)
        return builder.icmp_unsigned("!=", raw, ir.Constant(_vt(_I8), None))

    return sig, codegen


@intrinsic
def mld_part(typingctx, addr, idx, cnt):
    """The first cnt bools at addr[idx:]; lanes >= cnt are False."""
    sig = MASK(addr, idx, cnt)

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(builder, args[0], args[1], _I8)
        raw = _masked_load(builder, ptr, _I8, _lanes(builder, args[2]))
        return builder.icmp_unsigned("!=", raw, ir.Constant(_vt(_I8), None))

    return sig, codegen


@intrinsic
def lanes(typingctx, cnt):
    """Mask of the lanes k < cnt."""
    sig = MASK(cnt)

    def codegen(context, builder, sig, args):
        return _lanes(builder, args[0])

    return sig, codegen


@intrinsic
def ld(typingctx, tag, addr, idx):
    """One element addr[idx] in the compute type."""
    st, ct = _storage(tag)
    sig = ct(tag, addr, idx)

    def codegen(context, builder, sig, args):
        raw = builder.load(_elem_ptr(builder, args[1], args[2], st), typ=st)
        if st == _I16:
            return builder.fpext(builder.bitcast(raw, _F16), _F32)
        if st == _I8:
            return builder.icmp_unsigned("!=", raw, ir.Constant(_I8, 0))
        return raw

    return sig, codegen


@intrinsic
def st(typingctx, tag, addr, idx, value):
    """addr[idx] = value, rounded to the storage type."""
    stt, ct = _storage(tag)
    sig = types.none(tag, addr, idx, value)

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[3], sig.args[3], ct)
        if stt == _I16:
            v = builder.bitcast(builder.fptrunc(v, _F16), _I16)
        builder.store(v, _elem_ptr(builder, args[1], args[2], stt))
        return context.get_dummy_value()

    return sig, codegen


# ----------------------------------------------------------------------------------------------
# Lane arithmetic


@intrinsic
def splat(typingctx, tag, x):
    """x converted to the compute type of tag, in every lane."""
    _st, ct = _storage(tag)
    sig = Vec(ct)(tag, x)

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[1], sig.args[1], ct)
        return _splat(builder, v, _vt(_llvm(ct)))

    return sig, codegen


def _binary(op):
    def impl(typingctx, a, b):
        if not (isinstance(a, Vec) and a == b):
            return None
        sig = a(a, b)

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])

        return sig, codegen

    impl.__name__ = "v" + op[1:]
    return intrinsic(impl)


vadd, vsub, vmul, vdiv = (_binary(o) for o in ("fadd", "fsub", "fmul", "fdiv"))


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, rounded once."""
    if not (isinstance(a, Vec) and a == b == c):
        return None
    sig = a(a, b, c)

    def codegen(context, builder, sig, args):
        return _fma(builder, *args)

    return sig, codegen


@intrinsic
def vmax(typingctx, a, b):
    """b where b > a, else a: a NaN in b is ignored (callers carry NaN through the sums)."""
    if not (isinstance(a, Vec) and a == b):
        return None
    sig = a(a, b)

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[1], args[0]), args[1], args[0])

    return sig, codegen


@intrinsic
def vsel(typingctx, m, a, b):
    """a where m, else b."""
    if not (m == MASK and isinstance(a, Vec) and a == b):
        return None
    sig = a(m, a, b)

    def codegen(context, builder, sig, args):
        return builder.select(*args)

    return sig, codegen


@intrinsic
def vlt(typingctx, a, b):
    """Mask a < b (False where either is NaN)."""
    if not (isinstance(a, Vec) and a == b):
        return None
    sig = MASK(a, b)

    def codegen(context, builder, sig, args):
        return builder.fcmp_ordered("<", args[0], args[1])

    return sig, codegen


@intrinsic
def vany(typingctx, m):
    """True when any lane of the mask is set."""
    if m != MASK:
        return None
    sig = types.boolean(m)

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_I1, [args[0].type])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.or.v{W}i1")
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def vabs(typingctx, a):
    if not isinstance(a, Vec):
        return None
    sig = a(a)

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(args[0].type, [args[0].type])
        name = f"llvm.fabs.v{W}{_suffix(_llvm(sig.args[0].dtype))}"
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)

    return sig, codegen


@intrinsic
def vcopysign(typingctx, mag, sign):
    """|mag| with the sign of `sign`."""
    if not (isinstance(mag, Vec) and mag == sign):
        return None
    sig = mag(mag, sign)

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(args[0].type, [args[0].type, args[0].type])
        name = f"llvm.copysign.v{W}{_suffix(_llvm(sig.args[0].dtype))}"
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)

    return sig, codegen


@intrinsic
def wide(typingctx, a):
    """float64 lanes (exact) of float32 / float64 lanes: the accumulators' type."""
    if not isinstance(a, Vec):
        return None
    out = Vec(types.float64)
    sig = out(a)

    def codegen(context, builder, sig, args):
        if sig.args[0].dtype == types.float64:
            return args[0]
        return builder.fpext(args[0], _vt(_F64))

    return sig, codegen


@intrinsic
def acc(typingctx, tag, a):
    """a's lanes in the accumulator type named by tag (float32 or float64; exact widening)."""
    _st, at = _storage(tag)
    if not isinstance(a, Vec) or at not in (types.float32, types.float64):
        return None
    out = Vec(at)
    sig = out(tag, a)

    def codegen(context, builder, sig, args):
        if sig.args[1].dtype == at:
            return args[1]
        if at == types.float64:
            return builder.fpext(args[1], _vt(_F64))
        return builder.fptrunc(args[1], _vt(_F32))

    return sig, codegen


def _tree(builder, v, combine):
    """Combine the W lanes pairwise: (0..W/2-1) with (W/2..W-1), then halves again: a fixed
    order, the same on every machine."""
    n = W
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, h), list(range(h, n))))
        v = combine(lo, hi)
        n = h
    return builder.extract_element(v, ir.Constant(_I32, 0))


@intrinsic
def hsum(typingctx, a):
    """Sum of the lanes by the fixed tree."""
    if not isinstance(a, Vec):
        return None
    sig = a.dtype(a)

    def codegen(context, builder, sig, args):
        return _tree(builder, args[0], builder.fadd)

    return sig, codegen


@intrinsic
def hmax(typingctx, a):
    """Largest lane (NaN lanes ignored, as in vmax)."""
    if not isinstance(a, Vec):
        return None
    sig = a.dtype(a)

    def codegen(context, builder, sig, args):
        def mx(x, y):
            return builder.select(builder.fcmp_ordered(">", y, x), y, x)

        return _tree(builder, args[0], mx)

    return sig, codegen


@intrinsic
def lane0(typingctx, a):
    if not isinstance(a, Vec):
        return None
    sig = a.dtype(a)

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], ir.Constant(_I32, 0))

    return sig, codegen


# exp: x = n ln2 + r, |r| <= ln2 / 2, n = round(x / ln2) by the 1.5 * 2^p trick (exact, no
# rounding-mode dependence), r by two FMAs with ln2 split in a short high part (n * hi exact)
# and a low part; exp(r) by a polynomial in Horner form (FMAs); 2^n applied as two power-of-two
# factors 2^(n//2) 2^(n - n//2), so results down to the subnormals are rounded once and n = 128 /
# 1024 does not overflow the exponent field early. Below the smallest subnormal: 0 (exp(-inf) =
# 0), above the largest finite: inf, NaN stays NaN.
#   float32: Cephes' expf polynomial (degree 7 incl. 1 + r), max error ~1 ulp (measured 0.7 ulp)
#   float64: Taylor to degree 13, truncation < 4.3e-18 relative at |r| = ln2 / 2 (~0.04 ulp)
_EXP32 = dict(
    lo=-103.972084045410, hi=88.7228317260742, lo_normal=-87.3365447505531,
    log2e=1.44269502162933, magic=12582912.0,
    ln2_hi=0.693145751953125, ln2_lo=1.428606765330187e-06, bias=127, mbits=23, ibits=32,
    poly=(1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
          5.0000001201e-1, 1.0, 1.0),
)  # fmt: skip
_EXP64 = dict(
    lo=-745.2, hi=709.782712893384, lo_normal=-708.396418532264,
    log2e=1.4426950408889634, magic=6755399441055744.0,
    ln2_hi=0.6931471803691238, ln2_lo=1.9082149292705877e-10, bias=1023, mbits=52, ibits=64,
    poly=tuple(1.0 / math.factorial(k) for k in range(13, -1, -1)),
)  # fmt: skip


def _exp_constants(ft):
    """[(name, LLVM constant vector)] of the exp below, in one fixed order. Integer constants
    are carried as float lanes of the same bits (bitcast where used)."""
    c = _EXP32 if ft == _F32 else _EXP64
    vty = _vt(ft)
    fdt, idt = (np.float32, np.int32) if ft == _F32 else (np.float64, np.int64)
    magic_bits = int(np.array(c["magic"], fdt).view(idt))
    out = [(name, _vconst(vty, c[name])) for name in ("lo", "hi", "lo_normal", "log2e", "magic")]
    out += [("mln2_hi", _vconst(vty, -c["ln2_hi"])), ("mln2_lo", _vconst(vty, -c["ln2_lo"]))]
    out += [("zero", _vconst(vty, 0.0)), ("inf", _vconst(vty, math.inf))]
    out += [(f"p{i}", _vconst(vty, v)) for i, v in enumerate(c["poly"])]
    for name, v in (("magic_bits", magic_bits), ("bias", c["bias"])):
        out.append((name, _vconst(vty, float(np.array(v, idt).view(fdt)))))  # the same bits
    return out


def _vexp_ir(builder, x, ft, neg=False, consts=None):
    """exp of the lanes of x. neg: the caller guarantees x <= 0 or NaN (x = z - max z), so
    there is no overflow to handle and results below the smallest normal are flushed to 0 (an
    absolute error under 1.2e-38 / 2.3e-308): one power-of-two factor, no clamping.
    consts: {name: vector} from exp_consts (values LLVM keeps in registers), else literals."""
    c = _EXP32 if ft == _F32 else _EXP64
    vty = _vt(ft)
    ity = _vt(ir.IntType(c["ibits"]))
    k = consts if consts is not None else dict(_exp_constants(ft))
    ki = lambda name: builder.bitcast(k[name], ity)  # noqa: E731
    if neg:
        below = builder.fcmp_ordered("<", x, k["lo_normal"])
        xc = x
    else:
        below = builder.fcmp_ordered("<", x, k["lo"])
        above = builder.fcmp_ordered(">", x, k["hi"])
        xc = builder.select(below, k["lo"], x)  # NaN passes through both selects
        xc = builder.select(above, k["hi"], xc)
    t = _fma(builder, xc, k["log2e"], k["magic"])
    n = builder.fsub(t, k["magic"])
    r = _fma(builder, n, k["mln2_hi"], xc)
    r = _fma(builder, n, k["mln2_lo"], r)
    p = k["p0"]
    for i in range(1, len(c["poly"])):
        p = _fma(builder, p, r, k[f"p{i}"])
    ni = builder.sub(builder.bitcast(t, ity), ki("magic_bits"))
    mbits = _vconst(ity, c["mbits"])  # shift counts: immediates
    if neg:
        # x in [lo_normal, 0]: n in [-126, 0] (float64: [-1022, 0]), 2^n a normal number
        s1 = builder.bitcast(builder.shl(builder.add(ni, ki("bias")), mbits), vty)
        return builder.select(below, k["zero"], builder.fmul(p, s1))
    n1 = builder.ashr(ni, _vconst(ity, 1))
    n2 = builder.sub(ni, n1)
    s1 = builder.bitcast(builder.shl(builder.add(n1, ki("bias")), mbits), vty)
    s2 = builder.bitcast(builder.shl(builder.add(n2, ki("bias")), mbits), vty)
    y = builder.fmul(builder.fmul(p, s1), s2)
    y = builder.select(below, k["zero"], y)
    return builder.select(above, k["inf"], y)


_X86 = (
    __import__("llvmlite.binding", fromlist=["binding"])
    .get_process_triple()
    .startswith(("x86_64", "i686"))
)


def _opaque(builder, v):
    """The splat constant v rebuilt from its scalar passed through an empty asm statement: the
    same bits, but LLVM can no longer see a constant, so it keeps the vector in a register (or
    a stack slot) instead of re-loading it from the constant pool at every use -- which under
    the JIT's large code model costs an address load (movabs) plus a broadcast per constant per
    loop iteration. The scalar goes through an SSE register ("x"), valid on every x86-64;
    elsewhere the constant itself is returned."""
    if not _X86:
        return v
    scalar = v.constant[0] if isinstance(v.constant, list) else v.constant
    c = ir.Constant(v.type.element, scalar.constant if isinstance(scalar, ir.Constant) else scalar)
    hidden = builder.asm(ir.FunctionType(c.type, [c.type]), "", "=x,0", [c], False)
    return _splat(builder, hidden, v.type)


@intrinsic
def exp_consts(typingctx, tag):
    """The exp's constants for the compute type of tag, as values held in registers: make them
    once per kernel call and pass them to vexp / vexpn in the loops."""
    _st, ct = _storage(tag)
    ft = _llvm(ct)
    n = len(_exp_constants(ft))
    ret = types.UniTuple(Vec(ct), n)
    sig = ret(tag)

    def codegen(context, builder, sig, args):
        vals = [_opaque(builder, v) for _name, v in _exp_constants(ft)]
        return context.make_tuple(builder, sig.return_type, vals)

    return sig, codegen


def _consts_arg(builder, tup, ft):
    names = [name for name, _v in _exp_constants(ft)]
    return {name: builder.extract_value(tup, i) for i, name in enumerate(names)}


def _exp_intrinsic(neg: bool, with_consts: bool):
    def impl(typingctx, a, *consts):
        if not isinstance(a, Vec) or len(consts) != int(with_consts):
            return None
        sig = a(a, *consts)

        def codegen(context, builder, sig, args):
            ft = _llvm(sig.args[0].dtype)
            k = _consts_arg(builder, args[1], ft) if with_consts else None
            return _vexp_ir(builder, args[0], ft, neg=neg, consts=k)

        return sig, codegen

    if with_consts:

        def typer(typingctx, a, consts):
            return impl(typingctx, a, consts)
    else:

        def typer(typingctx, a):
            return impl(typingctx, a)

    typer.__name__ = ("vexpn" if neg else "vexp") + ("_c" if with_consts else "")
    return intrinsic(typer)


# exp per lane (see above); vexpn: of arguments <= 0 (or NaN), z - max(z): cheaper (no
# overflow, no clamping), flushes results below the smallest normal number to 0. The _c forms
# take the kernel's exp_consts(tag) (constants held in registers across the loops).
vexp = _exp_intrinsic(False, False)
vexpn = _exp_intrinsic(True, False)
vexp_c = _exp_intrinsic(False, True)
vexpn_c = _exp_intrinsic(True, True)


# tanh (the softcap): Cephes' tanhf / tanh. |u| < 0.625: u + u z P(z), z = u^2 (float32: degree 5
# polynomial; float64: the rational P(z) / Q(z)); else 1 - 2 / (exp(2|u|) + 1), which is 1 for
# large |u| (exp overflows to inf) and NaN for NaN; the sign copied back. Max error ~2 ulp.
_TANH32_P = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1,
             -3.33332819422e-1)  # fmt: skip
_TANH64_P = (-9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3)
_TANH64_Q = (1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3)


def _vtanh_ir(builder, u, ft):
    vty = _vt(ft)
    k = lambda v: _vconst(vty, v)  # noqa: E731
    fnty = ir.FunctionType(vty, [vty])
    fabs = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fabs.v{W}{_suffix(ft)}")
    a = builder.call(fabs, [u])
    z = builder.fmul(a, a)
    if ft == _F32:
        p = k(_TANH32_P[0])
        for coef in _TANH32_P[1:]:
            p = _fma(builder, p, z, k(coef))
    else:
        p = k(_TANH64_P[0])
        for coef in _TANH64_P[1:]:
            p = _fma(builder, p, z, k(coef))
        q = builder.fadd(z, k(_TANH64_Q[0]))
        for coef in _TANH64_Q[1:]:
            q = _fma(builder, q, z, k(coef))
        p = builder.fdiv(p, q)
    small = _fma(builder, builder.fmul(a, z), p, a)
    e = _vexp_ir(builder, builder.fadd(a, a), ft)
    large = builder.fsub(k(1.0), builder.fdiv(k(2.0), builder.fadd(e, k(1.0))))
    r = builder.select(builder.fcmp_ordered("<", a, k(0.625)), small, large)
    fnty2 = ir.FunctionType(vty, [vty, vty])
    cs = cgutils.get_or_insert_function(builder.module, fnty2, f"llvm.copysign.v{W}{_suffix(ft)}")
    return builder.call(cs, [r, u])


@intrinsic
def vtanh(typingctx, a):
    """tanh per lane (see above)."""
    if not isinstance(a, Vec):
        return None
    sig = a(a)

    def codegen(context, builder, sig, args):
        return _vtanh_ir(builder, args[0], _llvm(sig.args[0].dtype))

    return sig, codegen


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax forward
#
# Tags: xt names x's and out's storage (uint16 = float16), ct the compute type (float32 or
# float64 zero). Offsets are in elements: row r of x starts at x + r * xrs. Rows r0..r1-1.


@njit(**_JIT)
def softmax_fwd_kernel(xt, ct, at, et, x, xrs, o, ors, eb_, ers, mk, mrs, has_mask, scale, is_log,
                       n, r0, r1):  # fmt: skip
    # Per row, three passes, each a stream over the row (from L1/L2 after the first):
    #   1. m = max(s x) over the kept entries                          reads n
    #   2. S = sum exp(s x - m) in `at` lanes (float64; float32 for float16 data, whose result
    #      is rounded to 11 bits); softmax also stores e = exp(s x - m) into the e buffer: out
    #      itself, or for float16 out a float32 scratch row (rounding e to float16 there would
    #      round twice)                                                reads n, writes n
    #   3. softmax: out = e * (1 / S); log_softmax: out = (s x - m) - log S   reads n, writes n
    # (s x - m: one FMA.)
    # Masked entries take no part and get 0 / -inf, whatever the rest of the row holds.
    sc = splat(ct, scale)
    ec = exp_consts(ct)
    ninf = splat(ct, -math.inf)
    zero = splat(ct, 0.0)
    nf = n - n % W
    rem = n - nf
    tail = lanes(rem)
    for r in range(r0, r1):
        xb = r * xrs
        ob = r * ors
        mb = r * mrs
        eb = r * ers
        a0 = ninf
        a1 = ninf
        j = 0
        while j + 2 * W <= n:
            v0 = vmul(vld(xt, x, xb + j), sc)
            v1 = vmul(vld(xt, x, xb + j + W), sc)
            if has_mask:
                v0 = vsel(mld(mk, mb + j), v0, ninf)
                v1 = vsel(mld(mk, mb + j + W), v1, ninf)
            a0 = vmax(a0, v0)
            a1 = vmax(a1, v1)
            j += 2 * W
        if j < nf:
            v0 = vmul(vld(xt, x, xb + j), sc)
            if has_mask:
                v0 = vsel(mld(mk, mb + j), v0, ninf)
            a0 = vmax(a0, v0)
        if rem:
            v1 = vmul(vld_part(xt, x, xb + nf, rem, 0.0), sc)
            if has_mask:
                v1 = vsel(mld_part(mk, mb + nf, rem), v1, ninf)
            a1 = vmax(a1, vsel(tail, v1, ninf))
        m = hmax(vmax(a0, a1))
        # s x - m as one FMA, rounded once: it can exceed 0 by a rounding of s x (the max is
        # of rounded products), which the non-positive exp still gets right
        nmv = splat(ct, -m)
        # pass 2
        s0 = acc(at, zero)
        for j in range(0, nf, W):
            e = vexpn_c(vfma(vld(xt, x, xb + j), sc, nmv), ec)
            if has_mask:
                e = vsel(mld(mk, mb + j), e, zero)
            if not is_log:
                vst(et, eb_, eb + j, e)
            s0 = vadd(s0, acc(at, e))
        if rem:
            e = vexpn_c(vfma(vld_part(xt, x, xb + nf, rem, 0.0), sc, nmv), ec)
            if has_mask:
                e = vsel(mld_part(mk, mb + nf, rem), e, zero)
            else:
                e = vsel(tail, e, zero)
            if not is_log:
                vst_part(et, eb_, eb + nf, rem, e)
            s0 = vadd(s0, acc(at, e))
        s = hsum(s0)
        if has_mask and s == 0.0:
            # no kept entry in the row (a kept entry gives exp(0) = 1, or NaN): all fill
            fill = ninf if is_log else zero
            for j in range(0, nf, W):
                vst(xt, o, ob + j, fill)
            if rem:
                vst_part(xt, o, ob + nf, rem, fill)
            continue
        # pass 3
        if is_log:
            ls = splat(ct, math.log(s))
            for j in range(0, nf, W):
                y = vsub(vfma(vld(xt, x, xb + j), sc, nmv), ls)
                if has_mask:
                    y = vsel(mld(mk, mb + j), y, ninf)
                vst(xt, o, ob + j, y)
            if rem:
                y = vsub(vfma(vld_part(xt, x, xb + nf, rem, 0.0), sc, nmv), ls)
                if has_mask:
                    y = vsel(mld_part(mk, mb + nf, rem), y, ninf)
                vst_part(xt, o, ob + nf, rem, y)
        else:
            inv = splat(ct, 1.0 / s)
            for j in range(0, nf, W):
                y = vmul(vld(et, eb_, eb + j), inv)
                if has_mask:  # 0 even where inv is NaN (a NaN elsewhere in the row)
                    y = vsel(mld(mk, mb + j), y, zero)
                vst(xt, o, ob + j, y)
            if rem:
                y = vmul(vld_part(et, eb_, eb + nf, rem, 0.0), inv)
                if has_mask:
                    y = vsel(mld_part(mk, mb + nf, rem), y, zero)
                vst_part(xt, o, ob + nf, rem, y)


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax backward


@njit(**_JIT)
def _exp_of_logp(ct, yy, ec):
    """exp(y) of log-probabilities: the cheaper exp, and where a lane is > 0 (never for y from
    the forward; checked per vector, so any y is right) the full one for that vector. Measured
    at 4096 x 4096 float32, one thread: 8.3 ms, against 7.6 ms unchecked and 10.1 ms with the
    full exp everywhere."""
    pos = vlt(splat(ct, 0.0), yy)
    e = vexpn_c(yy, ec)  # garbage in the lanes > 0, replaced below
    if vany(pos):
        e = vsel(pos, vexp_c(yy, ec), e)
    return e


@njit(**_JIT)
def softmax_bwd_kernel(xt, ct, at, dy, drs, y, yrs, o, ors, scale, is_log, n, r0, r1):
    # softmax:     dx = s * y * (dy - dot(dy, y))     reads 2 x n, writes n
    # log_softmax: dx = s * (dy - exp(y) * sum(dy))   reads 2 x n, writes n
    # Pass 1: the row sum in `at` lanes: float64 for float32 / float64 data, so that a sum that
    # nearly cancels (zero-mean dy) keeps its accuracy (float32 products are exact in float64);
    # float32 for float16 data (products of 11-bit values are exact in float32, and its error
    # stays ~100x under float16's resolution). log_softmax's pass 1 reads dy only (reading y
    # there too measured 40% slower at 4096 x 4096). Pass 2 reads dy and y (dy from L1/L2)
    # before writing out at the same offsets: out may be dy's or y's memory.
    sc = splat(ct, scale)
    ec = exp_consts(ct)
    zero = splat(ct, 0.0)
    nf = n - n % W
    rem = n - nf
    for r in range(r0, r1):
        db = r * drs
        yb = r * yrs
        ob = r * ors
        # four accumulators, four vectors per step: short rows (256 elements: 4 steps) spend
        # less on the loop and keep more loads in flight (measured 32768 x 256 float16, two
        # threads: 1.48 -> 1.09 ms against two accumulators). Element j still goes to one fixed
        # lane of one fixed accumulator: vector 4k + i of the 4-vector steps to a_i, the full
        # vectors after them to a0, a last partial one to a1.
        a0 = acc(at, zero)
        a1 = acc(at, zero)
        a2 = acc(at, zero)
        a3 = acc(at, zero)
        j = 0
        while j + 4 * W <= n:
            d0 = acc(at, vld(xt, dy, db + j))
            d1 = acc(at, vld(xt, dy, db + j + W))
            d2 = acc(at, vld(xt, dy, db + j + 2 * W))
            d3 = acc(at, vld(xt, dy, db + j + 3 * W))
            if is_log:
                a0 = vadd(a0, d0)
                a1 = vadd(a1, d1)
                a2 = vadd(a2, d2)
                a3 = vadd(a3, d3)
            else:
                a0 = vfma(d0, acc(at, vld(xt, y, yb + j)), a0)
                a1 = vfma(d1, acc(at, vld(xt, y, yb + j + W)), a1)
                a2 = vfma(d2, acc(at, vld(xt, y, yb + j + 2 * W)), a2)
                a3 = vfma(d3, acc(at, vld(xt, y, yb + j + 3 * W)), a3)
            j += 4 * W
        while j < nf:
            d0 = acc(at, vld(xt, dy, db + j))
            if is_log:
                a0 = vadd(a0, d0)
            else:
                a0 = vfma(d0, acc(at, vld(xt, y, yb + j)), a0)
            j += W
        if rem:
            d1 = acc(at, vld_part(xt, dy, db + nf, rem, 0.0))
            if is_log:
                a1 = vadd(a1, d1)
            else:
                a1 = vfma(d1, acc(at, vld_part(xt, y, yb + nf, rem, 0.0)), a1)
        sv = splat(ct, hsum(vadd(vadd(a0, a1), vadd(a2, a3))))
        j = 0
        while j + 2 * W <= nf:
            d = vld(xt, dy, db + j)
            yy = vld(xt, y, yb + j)
            d1 = vld(xt, dy, db + j + W)
            y1 = vld(xt, y, yb + j + W)
            if is_log:
                g = vsub(d, vmul(_exp_of_logp(ct, yy, ec), sv))
                g1 = vsub(d1, vmul(_exp_of_logp(ct, y1, ec), sv))
            else:
                g = vmul(vsub(d, sv), yy)
                g1 = vmul(vsub(d1, sv), y1)
            vst(xt, o, ob + j, vmul(g, sc))
            vst(xt, o, ob + j + W, vmul(g1, sc))
            j += 2 * W
        if j < nf:
            d = vld(xt, dy, db + j)
            yy = vld(xt, y, yb + j)
            if is_log:
                g = vsub(d, vmul(_exp_of_logp(ct, yy, ec), sv))
            else:
                g = vmul(vsub(d, sv), yy)
            vst(xt, o, ob + j, vmul(g, sc))
        if rem:
            d = vld_part(xt, dy, db + nf, rem, 0.0)
            yy = vld_part(xt, y, yb + nf, rem, 0.0)
            if is_log:
                g = vsub(d, vmul(_exp_of_logp(ct, yy, ec), sv))
            else:
                g = vmul(vsub(d, sv), yy)
            vst_part(xt, o, ob + nf, rem, vmul(g, sc))


# ----------------------------------------------------------------------------------------------
# cross-entropy. The maths is dispatch.py's docstring; the kernels follow the NumPy backend's
# order of operations (zs = z - m in the compute dtype, sums of it in float64 lanes, lse - z_c
# as log_s - zs_c, the target's 1 - p_t as -expm1(zs_t - log_s)). Class targets arrive as
# int64, and a target is used as an offset only when it lies in [0, C): any value is safe.

_I64_TAG = np.int64(0)


@njit(**_JIT)
def _z(xt, x, idx, has_cap, capv, icapv):
    """(z, tanh(x / cap)) of W logits at x[idx:]: z = cap tanh(x / cap) with a softcap, else x
    (and the second item unused)."""
    v = vld(xt, x, idx)
    if has_cap:
        th = vtanh(vmul(v, icapv))
        return vmul(th, capv), th
    return v, v


@njit(**_JIT)
def _z_part(xt, x, idx, cnt, has_cap, capv, icapv):
    v = vld_part(xt, x, idx, cnt, 0.0)
    if has_cap:
        th = vtanh(vmul(v, icapv))
        return vmul(th, capv), th
    return v, v


@njit(**_JIT)
def _row_zmax(xt, ct, x, xb, n, has_cap, capv, icapv):
    """max(z) of a row (NaN ignored: it reaches the results through the sums)."""
    ninf = splat(ct, -math.inf)
    nf = n - n % W
    a0 = ninf
    a1 = ninf
    j = 0
    while j + 2 * W <= n:
        z0, _t0 = _z(xt, x, xb + j, has_cap, capv, icapv)
        z1, _t1 = _z(xt, x, xb + j + W, has_cap, capv, icapv)
        a0 = vmax(a0, z0)
        a1 = vmax(a1, z1)
        j += 2 * W
    if j < nf:
        z0, _t0 = _z(xt, x, xb + j, has_cap, capv, icapv)
        a0 = vmax(a0, z0)
    if n > nf:
        z1, _t1 = _z_part(xt, x, xb + nf, n - nf, has_cap, capv, icapv)
        a1 = vmax(a1, vsel(lanes(n - nf), z1, ninf))
    return hmax(vmax(a0, a1))


@njit(**_JIT)
def _row_sums(xt, ct, ec, x, xb, q, qb, w, n, mv, has_cap, capv, icapv, soft, has_w, smooth,
              keepv, epsv):  # fmt: skip
    """Row sums in float64 lanes, zs = z - m: (sum exp(zs), sum w zs if smooth, sum w q' and
    sum w q' zs if soft, with q' = keep q + eps_c; pass keep 1, eps_c 0 for the raw q)."""
    zero = splat(ct, 0.0)
    one = splat(ct, 1.0)
    s = wide(zero)
    swz = wide(zero)
    sa = wide(zero)
    sb = wide(zero)
    for j in range(0, n, W):
        cnt = min(W, n - j)
        if cnt == W:
            z, _t = _z(xt, x, xb + j, has_cap, capv, icapv)
            wv = vld(ct, w, j) if has_w else one
        else:
            z, _t = _z_part(xt, x, xb + j, cnt, has_cap, capv, icapv)
            wv = vld_part(ct, w, j, cnt, 0.0) if has_w else one
        zs = vsub(z, mv)
        e = vexpn_c(zs, ec)
        if cnt < W:
            keep_lanes = lanes(cnt)
            e = vsel(keep_lanes, e, zero)
            zs = vsel(keep_lanes, zs, zero)
        s = vadd(s, wide(e))
        if smooth:
            swz = vfma(wide(wv), wide(zs), swz)
        if soft:
            qv = vld(xt, q, qb + j) if cnt == W else vld_part(xt, q, qb + j, cnt, 0.0)
            wq = vmul(vfma(qv, keepv, epsv), wv)
            if cnt < W:
                wq = vsel(lanes(cnt), wq, zero)
            sa = vadd(sa, wide(wq))
            sb = vfma(wide(wq), wide(zs), sb)
    return hsum(s), hsum(swz), hsum(sa), hsum(sb)


@njit(**_JIT)
def _fill_row(xt, ct, g, gb, n, value):
    v = splat(ct, value)
    nf = n - n % W
    for j in range(0, nf, W):
        vst(xt, g, gb + j, v)
    if n > nf:
        vst_part(xt, g, gb + nf, n - nf, v)


@njit(**_JIT)
def _grad_row(xt, ct, ec, x, xb, q, qb, w, g, gb, n, mv, invv, av, scv, has_cap, capv, icapv, soft,
              has_w, keepv, epsv, smooth, neg):  # fmt: skip
    """g = (a p - eps_c w) * scale (soft: a p - w q') times the softcap's 1 - tanh^2, with
    p = exp(z - m) * inv (neg: m is the row max, z - m <= 0); every element of a vector is read
    before it is written (in place)."""
    one = splat(ct, 1.0)
    for j in range(0, n, W):
        cnt = min(W, n - j)
        if cnt == W:
            z, th = _z(xt, x, xb + j, has_cap, capv, icapv)
        else:
            z, th = _z_part(xt, x, xb + j, cnt, has_cap, capv, icapv)
        zs = vsub(z, mv)
        gv = vmul(av, vmul(vexpn_c(zs, ec) if neg else vexp_c(zs, ec), invv))
        if soft or smooth:
            if has_w:
                wv = vld(ct, w, j) if cnt == W else vld_part(ct, w, j, cnt, 0.0)
            else:
                wv = one
            if soft:
                qv = vld(xt, q, qb + j) if cnt == W else vld_part(xt, q, qb + j, cnt, 0.0)
                gv = vsub(gv, vmul(vfma(qv, keepv, epsv), wv))
            else:
                gv = vsub(gv, vmul(epsv, wv))
        gv = vmul(gv, scv)
        if has_cap:
            gv = vmul(gv, vsub(one, vmul(th, th)))
        if cnt == W:
            vst(xt, g, gb + j, gv)
        else:
            vst_part(xt, g, gb + j, cnt, gv)


@njit(**_JIT)
def _z_at(xt, ct, x, idx, has_cap, capv, icapv):
    """(z, tanh) of the one logit x[idx], computed as the lanes compute it."""
    z, th = _z_part(xt, x, idx, 1, has_cap, capv, icapv)
    return lane0(z), lane0(th)


@njit(**_JIT)
def ce_fwd_kernel(xt, ct, x, xrs, tg, soft, q, qrs, w, has_w, w_total, ignore_index, keep,
                  eps_c, z_loss, has_cap, cap, row_loss, lse_out, has_lse, g, grs, has_grad,
                  gscale, n, r0, r1):  # fmt: skip
    # Per row: 1. m = max z (reads n), 2. the sums (reads n, and the soft targets), then the loss
    # and lse; 3. with a gradient, g (reads n again, writes n). A row's passes run back to back,
    # so 2. and 3. read the row from L1/L2 (L3 for rows over ~1 MiB). Ignored rows are not read
    # (unless lse is wanted); a bad target gives a NaN loss and gradient row.
    capv = splat(ct, cap)
    ec = exp_consts(ct)
    icapv = splat(ct, 1.0 / cap if has_cap else 1.0)
    keepv = splat(ct, keep)
    epsv = splat(ct, eps_c)
    smooth = eps_c != 0.0
    for r in range(r0, r1):
        xb = r * xrs
        qb = r * qrs
        gb = r * grs
        valid = True
        inr = False
        t = 0
        if not soft:
            t = ld(_I64_TAG, tg, r)
            valid = t != ignore_index
            inr = t >= 0 and t < n
        if not valid and not has_lse:
            st(ct, row_loss, r, 0.0)
            if has_grad:
                _fill_row(xt, ct, g, gb, n, 0.0)
            continue
        m = _row_zmax(xt, ct, x, xb, n, has_cap, capv, icapv)
        if m == -math.inf:
            m = lane0(splat(ct, 0.0))  # a row of -inf: exp(-inf - 0) = 0, s = 0
        mv = splat(ct, m)
        s, swz, sa, sb = _row_sums(xt, ct, ec, x, xb, q, qb, w, n, mv, has_cap, capv, icapv, soft,
                                   has_w, smooth and not soft, keepv, epsv)  # fmt: skip
        log_s = math.log(s)
        lse = m + log_s
        if has_lse:
            st(ct, lse_out, r, lse)
        if not valid:
            st(ct, row_loss, r, 0.0)
            if has_grad:
                _fill_row(xt, ct, g, gb, n, 0.0)
            continue
        zs_t = 0.0
        th_t = 0.0
        kwt = 0.0
        w_t = 1.0
        if soft:
            a = sa
            loss = log_s * sa - sb
        elif inr:
            z_t, th_t = _z_at(xt, ct, x, xb + t, has_cap, capv, icapv)
            zs_t = lane0(vsub(splat(ct, z_t), mv))
            if has_w:
                w_t = ld(ct, w, t)
            kwt = keep * w_t
            loss = kwt * (log_s - zs_t)
            a = kwt
            if smooth:
                loss += eps_c * (w_total * log_s - swz)
                a += eps_c * w_total
        else:
            loss = math.nan
            a = math.nan
        if z_loss != 0.0:
            loss += z_loss * lse * lse
            a += 2.0 * z_loss * lse
        st(ct, row_loss, r, loss)
        if not has_grad:
            continue
        if not soft and not inr:
            _fill_row(xt, ct, g, gb, n, math.nan)
            continue
        invv = splat(ct, 1.0 / s)
        scv = splat(ct, gscale)
        _grad_row(xt, ct, ec, x, xb, q, qb, w, g, gb, n, mv, invv, splat(ct, a), scv, has_cap, capv,
                  icapv, soft, has_w, keepv, epsv, smooth, True)  # fmt: skip
        if not soft:
            # the target entry from the shifted logit: (a - k w_t) p_t - k w_t (1 - p_t)
            p_t = lane0(vmul(vexpn(splat(ct, zs_t)), invv))
            q_t = -math.expm1(zs_t - log_s)
            g_t = (a - kwt) * p_t - kwt * q_t
            if smooth:
                g_t -= eps_c * w_t
            g_t *= gscale
            if has_cap:
                g_t *= 1.0 - th_t * th_t
            st(xt, g, gb + t, g_t)


@njit(**_JIT)
def ce_stats_kernel(xt, ct, x, xrs, tg, soft, q, qrs, w, has_w, smooth, vocab_start, has_cap,
                    cap, stats, k, n, r0, r1):  # fmt: skip
    # Per row into stats[r, :k]: class [m, s, zs_t, (w_t), (sum w zs)], soft [m, s, sum w q,
    # sum w q zs, (sum w zs)], zs = z - m (m -> 0 for a row of -inf). Reads the logits (and the
    # soft targets) twice: max, then the sums (from L1/L2).
    capv = splat(ct, cap)
    ec = exp_consts(ct)
    icapv = splat(ct, 1.0 / cap if has_cap else 1.0)
    one = splat(ct, 1.0)
    zero = splat(ct, 0.0)
    for r in range(r0, r1):
        xb = r * xrs
        qb = r * qrs
        sb_ = r * k
        m = _row_zmax(xt, ct, x, xb, n, has_cap, capv, icapv)
        shift = lane0(zero) if m == -math.inf else m
        mv = splat(ct, shift)
        s, swz, sa, sb = _row_sums(xt, ct, ec, x, xb, q, qb, w, n, mv, has_cap, capv, icapv, soft,
                                   has_w, smooth, one, zero)  # fmt: skip
        st(ct, stats, sb_, m)
        st(ct, stats, sb_ + 1, s)
        c = 2
        if soft:
            st(ct, stats, sb_ + 2, sa)
            st(ct, stats, sb_ + 3, sb)
            c = 4
        else:
            tl = ld(_I64_TAG, tg, r) - vocab_start
            owned = tl >= 0 and tl < n
            zs_t = 0.0
            w_t = 0.0
            if owned:
                z_t, _th = _z_at(xt, ct, x, xb + tl, has_cap, capv, icapv)
                zs_t = lane0(vsub(splat(ct, z_t), mv))
                w_t = ld(ct, w, tl) if has_w else 1.0
            st(ct, stats, sb_ + 2, zs_t)
            c = 3
            if has_w:
                st(ct, stats, sb_ + 3, w_t)
                c = 4
        if smooth:
            st(ct, stats, sb_ + c, swz)


@njit(**_JIT)
def ce_grad_kernel(xt, ct, x, xrs, tg, soft, q, qrs, w, has_w, ignore_index, vocab_start, keep,
                   eps_c, has_cap, cap, row_lse, row_coef, gscale, g, grs, n, r0, r1):  # fmt: skip
    # g = (coef p - keep w_t onehot - eps_c w) * scale (soft: coef p - w (keep q + eps_c)),
    # p = exp(z - lse), times the softcap's chain rule. Reads the logits once, writes g once;
    # the target logit is read before its row is written (g may be the logits' memory).
    capv = splat(ct, cap)
    ec = exp_consts(ct)
    icapv = splat(ct, 1.0 / cap if has_cap else 1.0)
    keepv = splat(ct, keep)
    epsv = splat(ct, eps_c)
    smooth = eps_c != 0.0
    scv = splat(ct, gscale)
    one = splat(ct, 1.0)
    for r in range(r0, r1):
        xb = r * xrs
        qb = r * qrs
        gb = r * grs
        owned = False
        tl = 0
        if not soft:
            t = ld(_I64_TAG, tg, r)
            if t == ignore_index:
                _fill_row(xt, ct, g, gb, n, 0.0)
                continue
            tl = t - vocab_start
            owned = tl >= 0 and tl < n
        lse = ld(ct, row_lse, r)
        a = ld(ct, row_coef, r)
        lv = splat(ct, lse)
        z_t = 0.0
        th_t = 0.0
        if owned:
            z_t, th_t = _z_at(xt, ct, x, xb + tl, has_cap, capv, icapv)
        _grad_row(xt, ct, ec, x, xb, q, qb, w, g, gb, n, lv, one, splat(ct, a), scv, has_cap, capv,
                  icapv, soft, has_w, keepv, epsv, smooth, False)  # fmt: skip
        if owned:
            zl = lane0(vsub(splat(ct, z_t), lv))  # z_t - lse in the compute dtype
            p_t = lane0(vexp(splat(ct, zl)))
            q_t = -math.expm1(zl)
            w_t = ld(ct, w, tl) if has_w else 1.0
            kwt = keep * w_t
            g_t = (a - kwt) * p_t - kwt * q_t
            if smooth:
                g_t -= eps_c * w_t
            g_t *= gscale
            if has_cap:
                g_t *= 1.0 - th_t * th_t
            st(xt, g, gb + tl, g_t)
