"""The per-process body of tests/test_vocab_parallel.py (a module of its own so that
torch.multiprocessing.spawn can import it in each child).

Every rank builds the same full problem from one seed, keeps its shard of the classes, calls
the vocabulary-parallel functions and compares with the dense float64 reference on the full
logits: the loss, this rank's slice of the gradient, the lse; the loss must be bitwise the same
on every rank; the collectives per call are counted.
"""

from __future__ import annotations

import os
import sys
import traceback

import numpy as np


def shard_bounds(v: int, world: int, layout: str) -> list[tuple[int, int]]:
    """[(start, size)] per rank: "equal" (v divisible), "uneven" (sizes differ by one),
    "padded" (the last rank holds the remainder of a vocabulary padded to a multiple)."""
    if layout == "equal":
        assert v % world == 0
        return [(r * (v // world), v // world) for r in range(world)]
    if layout == "uneven":
        base, extra = divmod(v, world)
        out, start = [], 0
        for r in range(world):
            n = base + (1 if r < extra else 0)
            out.append((start, n))
            start += n
        return out
    # padded: shards of ceil(v / world) except the last
    size = -(-v // world)
    out = []
    for r in range(world):
        start = min(v, r * size)
        out.append((start, max(0, min(v, start + size) - start)))
    return out


CASES = [
    # (V, layout, soft, opts)
    (12, "equal", False, {}),
    (1001, "uneven", False, {"label_smoothing": 0.1}),
    (1001, "uneven", False, {"weight": True, "ignore": True, "reduction": "sum"}),
    (37, "padded", False, {"weight": True, "label_smoothing": 0.2, "z_loss": 1e-2}),
    (48, "equal", False, {"reduction": "none", "softcap": 3.0, "grad_scale": 0.5}),
    (30, "uneven", True, {"label_smoothing": 0.15, "weight": True}),
    (24, "equal", True, {"reduction": "none", "z_loss": 1e-3}),
    (36, "equal", False, {"all_ignored": True}),
]


def _problem(seed, n_rows, v, soft, opts):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n_rows, v)) * 3
    if soft:
        target = rng.dirichlet(np.ones(v), size=n_rows)
    else:
        target = rng.integers(0, v, size=n_rows)
        if opts.get("ignore"):
            target[1] = -100
        if opts.get("all_ignored"):
            target[:] = -100
    weight = rng.random(v) + 0.25 if opts.get("weight") else None
    return logits, target, weight


def _sk_opts(opts):
    keys = ("reduction", "label_smoothing", "z_loss", "softcap")
    return {k: opts[k] for k in keys if k in opts}


def run(rank, world, port, result_dir, backend, counts, device="cpu"):
    """One rank: gloo on CPU tensors (device "cpu"), NCCL on GPU ``rank`` (device "cuda")."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(__file__))
    import softmax_kernels as sk

    from reference import TOL, ref_cross_entropy

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if device == "cuda":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)

    def tt(a, dtype=None):  # a tensor of this rank's device
        return torch.tensor(a, dtype=dtype, device=dev)

    calls = {"all_gather": 0, "all_reduce": 0}
    for name in ("all_gather_into_tensor", "all_gather_single", "all_reduce", "all_gather",
                 "all_to_all_single", "broadcast", "reduce_scatter_tensor"):  # fmt: skip
        real = getattr(dist, name, None)
        if real is None:
            continue
        key = "all_reduce" if name == "all_reduce" else "all_gather"

        def counted(*a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)

        setattr(dist, name, counted)
    failures = []
    try:
        for i, (v, layout, soft, opts) in enumerate(CASES):
            bounds = shard_bounds(v, world, layout)
            start, size = bounds[rank]
            logits, target, weight = _problem(100 + i, 9, v, soft, opts)
            gs = opts.get("grad_scale", 1.0)
            ref_loss, ref_grad, ref_lse = ref_cross_entropy(
                logits, target, weight=weight, grad_scale=gs, return_lse=True,
                **_sk_opts(opts),
            )  # fmt: skip
            x = tt(logits[:, start : start + size])
            t = tt(target[:, start : start + size] if soft else target)
            w = tt(weight[start : start + size]) if weight is not None else None
            kw = dict(weight=w, process_group=dist.group.WORLD, backend=backend, **_sk_opts(opts))
            if layout != "equal":
                kw["vocab_start"] = start
            for k in calls:
                calls[k] = 0
            loss, grad, lse = sk.cross_entropy_with_grad(x, t, grad_scale=gs, return_lse=True,
                                                          **kw)  # fmt: skip
            if calls != {"all_gather": 1, "all_reduce": 0}:
                failures.append(f"case {i}: collectives per call {calls}")
            what = f"case {i} (V={v} {layout} soft={soft} {opts}) rank {rank}/{world}"
            atol, rtol = TOL["float64"]
            np.testing.assert_allclose(
                loss.cpu().numpy(), ref_loss, atol=atol, rtol=rtol, err_msg=what
            )
            np.testing.assert_allclose(grad.cpu().numpy(), ref_grad[:, start : start + size],
                                       atol=atol, rtol=rtol, err_msg=what)  # fmt: skip
            np.testing.assert_allclose(
                lse.cpu().numpy(), ref_lse, atol=atol, rtol=rtol, err_msg=what
            )
            # the loss bitwise equal on every rank
            mine = loss.reshape(-1).clone()
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            if not all(torch.equal(e, every[0]) for e in every):
                failures.append(f"{what}: the loss differs between ranks")
            # loss only; autograd through the custom op
            loss2 = sk.cross_entropy(x, t, **kw)
            np.testing.assert_allclose(loss2.cpu().numpy(), ref_loss, atol=atol, rtol=rtol,
                                       err_msg=what + " (loss only)")  # fmt: skip
            xg = x.clone().requires_grad_()
            out = sk.cross_entropy(xg, t, **kw)
            (out.sum() * gs).backward()
            want = ref_grad[:, start : start + size]
            np.testing.assert_allclose(
                xg.grad.cpu().numpy(), want, atol=atol, rtol=rtol, err_msg=what + " (autograd)"
            )
            # in place
            xi = x.clone()
            _, gi = sk.cross_entropy_with_grad(xi, t, grad_scale=gs, inplace=True, **kw)
            assert gi is xi
            np.testing.assert_allclose(
                xi.cpu().numpy(), want, atol=atol, rtol=rtol, err_msg=what + " (in place)"
            )
        # one process group == no process group (world 1) is covered by world=1 runs; and a
        # float32 run within the float32 bound
        logits, target, _ = _problem(7, 6, 64, False, {})
        bounds = shard_bounds(64, world, "uneven")
        start, size = bounds[rank]
        ref_loss, ref_grad = ref_cross_entropy(logits, target)
        x = tt(logits[:, start : start + size], torch.float32)
        loss, grad = sk.cross_entropy_with_grad(x, tt(target), backend=backend,
                                                process_group=dist.group.WORLD,
                                                vocab_start=start)  # fmt: skip
        atol, rtol = TOL["float32"]
        np.testing.assert_allclose(loss.cpu().numpy(), ref_loss, atol=atol, rtol=rtol)
        np.testing.assert_allclose(grad.cpu().numpy(), ref_grad[:, start : start + size],
                                   atol=atol, rtol=rtol)  # fmt: skip
        # linear + vocabulary-parallel
        rng = np.random.default_rng(11)
        n, d, v = 10, 6, 29
        xs = rng.standard_normal((n, d))
        wfull = rng.standard_normal((v, d))
        bfull = rng.standard_normal(v)
        tl = rng.integers(0, v, size=n)
        tl[2] = -100
        start, size = shard_bounds(v, world, "uneven")[rank]
        ref = ref_cross_entropy(xs @ wfull.T + bfull, tl, label_smoothing=0.1)
        xt = tt(xs)
        wt, bt = (
            tt(wfull[start : start + size]),
            tt(bfull[start : start + size]),
        )
        for k in calls:
            calls[k] = 0
        loss, dx, dw, db = sk.linear_cross_entropy_with_grad(
            xt, wt, tt(tl), linear_bias=bt, label_smoothing=0.1, chunk_size=3,
            process_group=dist.group.WORLD, vocab_start=start, backend=backend,
        )  # fmt: skip
        if calls != {"all_gather": 1, "all_reduce": 1}:
            failures.append(f"linear: collectives per call {calls}")
        atol, rtol = TOL["float64"]
        np.testing.assert_allclose(loss.cpu().numpy(), ref[0], atol=atol, rtol=rtol)
        g = ref[1]  # d loss / d logits: dx = g @ W, dW = g^T x, db = sum g
        np.testing.assert_allclose(dx.cpu().numpy(), g @ wfull, atol=1e-11, rtol=1e-11)
        np.testing.assert_allclose(dw.cpu().numpy(), g[:, start : start + size].T @ xs, atol=1e-11,
                                   rtol=1e-11)  # fmt: skip
        np.testing.assert_allclose(db.cpu().numpy(), g[:, start : start + size].sum(0), atol=1e-11,
                                   rtol=1e-11)  # fmt: skip
    except Exception:
        failures.append(traceback.format_exc())
    finally:
        # every rank past its last collective before any tears down (rank 0 holds the store)
        dist.barrier()
        dist.destroy_process_group()
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(failures))
    # Leave without the interpreter's finalisation: gloo's C++ worker threads can still hold
    # objects whose destruction at that point aborts the process ("terminate called without an
    # active exception", pytorch#179291), after every result above was written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
