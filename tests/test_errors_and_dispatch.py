"""Bad input gets a clear error; backend choice and its errors; the info command."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from numpy.exceptions import AxisError

import softmax_kernels as sk
from softmax_kernels import dispatch

from reference import assert_close, ref_softmax

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("bad", [np.arange(6).reshape(2, 3), np.ones((2, 3), bool),
                                 np.ones((2, 3), np.complex64)])  # fmt: skip
def test_non_float_dtypes(target, bad):
    x = target.array(bad)
    for fn in (sk.softmax, sk.log_softmax, sk.softmax_jacobian):
        with pytest.raises(TypeError, match=f"x has dtype {str(x.dtype).replace('torch.', '')}"
                           if fn is not sk.softmax_jacobian else "y has dtype"):  # fmt: skip
            fn(x) if fn is sk.softmax_jacobian else fn(x, backend=target.backend)
    y = target.array(np.ones((2, 3)), "float32")
    with pytest.raises(TypeError, match="dy has dtype"):
        sk.softmax_backward(x, y, backend=target.backend)


def test_not_an_array():
    with pytest.raises(TypeError, match="x must be a numpy.ndarray, cupy.ndarray or torch"):
        sk.softmax([1.0, 2.0])


def test_axis_errors(target):
    x = target.array(np.ones((2, 3)), "float32")
    with pytest.raises(AxisError):
        sk.softmax(x, axis=2, backend=target.backend)
    with pytest.raises(ValueError):  # AxisError is a ValueError
        sk.log_softmax(x, axis=(0, -3), backend=target.backend)
    with pytest.raises(ValueError, match="repeated axis"):
        sk.softmax(x, axis=(1, -1), backend=target.backend)
    with pytest.raises(TypeError, match="axis must be an int"):
        sk.softmax(x, axis=1.0, backend=target.backend)


def test_argument_errors(target):
    x = target.array(np.ones((2, 3)), "float32")
    b = target.backend
    with pytest.raises(ValueError, match="scale must be finite"):
        sk.softmax(x, scale=float("nan"), backend=b)
    with pytest.raises(TypeError, match="scale must be a real number"):
        sk.softmax(x, scale="2", backend=b)
    with pytest.raises(TypeError, match="where must be a boolean array"):
        sk.softmax(x, where=target.array(np.ones((2, 3))), backend=b)
    with pytest.raises(ValueError, match=r"where of shape \(4,\) does not broadcast"):
        sk.softmax(x, where=target.array(np.ones(4, bool)), backend=b)
    with pytest.raises(ValueError, match=r"out has shape \(3, 2\), expected \(2, 3\)"):
        sk.softmax(x, out=target.array(np.ones((3, 2)), "float32"), backend=b)
    with pytest.raises(TypeError, match="out has dtype float64, expected float32"):
        sk.softmax(x, out=target.array(np.ones((2, 3)), "float64"), backend=b)
    with pytest.raises(ValueError, match=r"dy has shape \(2, 2\) but y has \(2, 3\)"):
        sk.softmax_backward(target.array(np.ones((2, 2)), "float32"), x, backend=b)
    with pytest.raises(TypeError, match="dy has dtype float64 but y has float32"):
        sk.softmax_backward(target.array(np.ones((2, 3)), "float64"), x, backend=b)


def test_mixed_array_kinds():
    x = np.ones((2, 3), np.float32)
    t = torch.ones((2, 3), dtype=torch.float32)
    with pytest.raises(TypeError, match="where is a torch array but x is a numpy array"):
        sk.softmax(x, where=torch.ones((2, 3), dtype=torch.bool))
    with pytest.raises(TypeError, match="dy is a numpy array but y is a torch array"):
        sk.softmax_backward(x, t)
    with pytest.raises(TypeError, match="target is a torch array but logits is a numpy array"):
        sk.cross_entropy(x, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="weight is a numpy array but logits is a torch array"):
        sk.cross_entropy(t, torch.zeros(2, dtype=torch.int64), weight=np.ones(3))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'; valid backends: numpy, tri"):
        sk.softmax(np.ones(3), backend="cuda")


def test_unavailable_backend_says_why():
    # the CuPy backend never serves NumPy arrays, on any machine
    with pytest.raises(sk.BackendUnavailableError, match="backend 'cupy' cannot serve") as e:
        sk.softmax(np.ones(3), backend="cupy")
    assert isinstance(e.value, RuntimeError)
    assert "numpy" in str(e.value)


def test_env_var_overrides_default(monkeypatch):
    monkeypatch.setenv("SOFTMAX_KERNELS_BACKEND", "numpy")
    assert dispatch.select(None, np.ones(3)).NAME == "numpy"
    monkeypatch.setenv("SOFTMAX_KERNELS_BACKEND", "cupy")
    with pytest.raises(sk.BackendUnavailableError):
        sk.softmax(np.ones(3))
    monkeypatch.setenv("SOFTMAX_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        sk.softmax(np.ones(3))
    # an explicit argument wins over the variable
    assert_close(sk.softmax(np.ones(3), backend="numpy"), np.full(3, 1 / 3), "float64")


def test_default_choice_for_cpu_inputs(monkeypatch):
    monkeypatch.delenv("SOFTMAX_KERNELS_BACKEND", raising=False)
    assert dispatch.select(None, np.ones(3)).NAME == "numpy"
    assert dispatch.select(None, torch.ones(3)).NAME == "numpy"


def test_available_backends():
    names = sk.available_backends()
    assert "numpy" in names and set(names) <= set(dispatch.BACKENDS)
    for name, reason in dispatch.backend_status().items():
        assert (reason is None) == (name in names)
        assert reason is None or len(reason) > 10


def test_torch_cpu_is_zero_copy_and_keeps_dtype():
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(4, 9, dtype=dt)
        y = sk.softmax(x, backend="numpy")
        assert isinstance(y, torch.Tensor) and y.dtype == dt and y.device == x.device
        assert_close(y, ref_softmax(x.double().numpy()), str(dt).replace("torch.", ""))
    # out= on a float32 tensor is written through a NumPy view of its memory
    x = torch.randn(3, 5)
    out = torch.empty(3, 5)
    ptr = out.data_ptr()
    assert sk.softmax(x, out=out, backend="numpy") is out and out.data_ptr() == ptr


def test_requires_grad_input_is_accepted():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = sk.softmax(x)
    assert_close(y, ref_softmax(x.detach().numpy()), "float64")


def test_dlpack_objects_are_imported():
    class Foreign:  # an array from another library that speaks DLPack
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, **kw):
            return self.t.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    t = torch.randn(2, 6)
    y = sk.softmax(Foreign(t))
    assert isinstance(y, torch.Tensor)
    assert_close(y, ref_softmax(t.double().numpy()), "float32")


def test_info_command():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "softmax_kernels", "info"], capture_output=True,
                       text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"softmax-kernels {sk.__version__}" in out
    for name in ("numpy", "triton", "cupy"):
        assert name in out
    assert "GPU:" in out and "torch" in out


def test_import_without_optional_packages():
    # the package imports, and the NumPy backend runs, with torch/triton/cupy unimportable
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'triton', 'cupy'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np, softmax_kernels as sk\n"
        "print(sk.available_backends())\n"
        "print(float(sk.cross_entropy(np.zeros((2, 4)), np.array([1, 2]))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["['numpy']", f"{np.log(4)}"]
