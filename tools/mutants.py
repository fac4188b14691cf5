"""The mutants of tools/mutation_campaign.py: small realistic bugs, one textual edit each.

Each entry: ``id``, ``file``, ``what`` (the bug in words), ``old`` (text that must occur exactly once in the file),
``new`` (its replacement) and ``tests`` (the test files run against the mutant; a mutant is caught when they fail).
Written on 2026-11-24 against the code of that day, independently of the campaign behind issue 15 (whose mutants
were not kept): other bugs of the same kinds (wrong index, wrong layout, missing check, wrong dtype, lost state).
"""

OP_TESTS = ["tests/test_op.py", "tests/test_op_errors.py"]

MUTANTS = [
    dict(id=1, file="ddf/_checks.py", what="out_size rounds down instead of up",
         old="return 0 if n == 0 else (n - 1) // stride + 1", new="return 0 if n == 0 else n // stride",
         tests=OP_TESTS),
    dict(id=2, file="ddf/_checks.py", what="channels_last rule ignores contiguity (every 4-D tensor is channels_last)",
         old="return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)",
         new="return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)",
         tests=OP_TESTS),
    dict(id=3, file="ddf/_checks.py", what="head divisibility check dropped",
         old="    if C % h != 0:\n        raise ValueError(f\"ddf: head={h} must divide",
         new="    if False:\n        raise ValueError(f\"ddf: head={h} must divide",
         tests=OP_TESTS),
    dict(id=4, file="ddf/_checks.py", what="even kernel sizes accepted",
         old='k = check_int("ddf", "kernel_size", kernel_size, 1, odd=True)',
         new='k = check_int("ddf", "kernel_size", kernel_size, 1)',
         tests=OP_TESTS),
    dict(id=5, file="ddf/reference.py", what="FilterNorm uses the biased std",
         old="return x / (x.std(dim=dim, keepdim=True) + eps)",
         new="return x / (x.std(dim=dim, keepdim=True, correction=0) + eps)",
         tests=OP_TESTS + ["tests/test_modules.py"]),
    dict(id=6, file="ddf/reference.py", what="padded taps no longer masked in the forward",
         old="    filt = torch.where(valid, filt, torch.zeros((), dtype=filt.dtype, device=filt.device))\n",
         new="", tests=OP_TESTS),
    dict(id=7, file="ddf/reference.py", what="reference output loses the channels_last layout",
         old="    out = (cols * filt).sum(dim=3).reshape(B, C, cols.shape[-2], cols.shape[-1]).to(input.dtype)\n"
             "    return out.contiguous(memory_format=memory_format_of(input))",
         new="    out = (cols * filt).sum(dim=3).reshape(B, C, cols.shape[-2], cols.shape[-1]).to(input.dtype)\n"
             "    return out.contiguous()",
         tests=OP_TESTS),
    dict(id=8, file="ddf/reference.py", what="half precision computed in half (no float32 upcast)",
         old="return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype",
         new="return t.dtype", tests=OP_TESTS),
    dict(id=9, file="ddf/reference.py", what="FilterNorm backward drops the std term",
         old="    return first - centred * coef", new="    return first", tests=OP_TESTS + ["tests/test_fused.py"]),
    dict(id=10, file="ddf/backends/registration.py", what="backward returns the channel grad in the spatial slot",
         old="return tuple(g if n else None for g, n in zip(grads, need[:3]))",
         new="return tuple(g if n else None for g, n in zip((grads[0], grads[2], grads[1]), need[:3]))",
         tests=OP_TESTS),
    dict(id=11, file="ddf/backends/registration.py", what="double backward returns grads in the wrong order",
         old="outs = torch.autograd.grad([p[0] for p in pairs], leaves, [p[1] for p in pairs], allow_unused=True)",
         new="outs = torch.autograd.grad([p[0] for p in pairs], leaves[::-1], [p[1] for p in pairs], "
             "allow_unused=True)[::-1]",
         tests=OP_TESTS),
    dict(id=12, file="ddf/backends/__init__.py", what="a forced backend that cannot run falls back silently",
         old="        if not ok:\n            raise RuntimeError(f\"ddf: backend {name!r} was requested",
         new="        if not ok:\n            return \"reference\"\n            raise RuntimeError(f\"ddf: backend {name!r} was requested",
         tests=OP_TESTS),
    dict(id=13, file="ddf/functional.py", what="legacy call form ddf(x, ch, sp, k, d, s, 'add') ignores the combine",
         old="        kernel_combine, head = head, 1", new="        head = 1", tests=OP_TESTS),
    dict(id=14, file="ddf/modules.py", what="FilterNorm in half precision without the float32 upcast",
         old="    if y.dtype in (torch.float16, torch.bfloat16):\n        return filter_norm(y.float(), dim=2).to(y.dtype)\n",
         new="", tests=["tests/test_modules.py", "tests/test_fused.py"]),
]
